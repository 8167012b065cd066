"""Config validates shape, registries validate names: config.py knows no registry, each method its own settings."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from sharp_unlearn import config
from sharp_unlearn.config import MethodConfig, OptimizerConfig, check_range, stable_hash
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods import METHODS, UnlearningMethod
from sharp_unlearn.validation import config_from_dict, load_config, method_param_classes

OFF = "tracking.enabled=false"


@dataclasses.dataclass
class ToyParams:
    toy_strength: float = 1.5
    toy_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2])

    def __post_init__(self) -> None:
        check_range("method.toy_strength", self.toy_strength, 0.0, lo_open=True)


class Toy(UnlearningMethod):
    """A throw-away method declared the way a new method file declares itself."""

    params_class = ToyParams

    def phases(self, epoch: int):
        return []


@pytest.fixture
def toy_method(monkeypatch):
    # registered for this test only (setitem undoes it): a method added without touching config.py
    monkeypatch.setitem(METHODS._members, "toy", Toy)
    return Toy


def test_config_module_imports_no_registry():
    tree = ast.parse(Path(config.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    registries = sorted(m for m in imported if m.startswith(("sharp_unlearn.data", "sharp_unlearn.models",
                                                             "sharp_unlearn.methods", "sharp_unlearn.registry")))
    assert registries == []


def test_a_new_method_brings_its_settings_without_an_edit_of_config(toy_method):
    cfg = load_config([], ["method.name=toy", "method.toy_strength=3", "method.toy_steps=[4]", OFF])
    assert (cfg.method.toy_strength, cfg.method.toy_steps) == (3.0, [4])  # typed by ToyParams: "3" -> 3.0
    flat = cfg.flat()
    assert flat["method.toy_strength"] == 3.0 and flat["method.toy_steps"] == [4]
    method = METHODS.get("toy")(cfg.method, cfg.optimizer, None)
    assert method.params == ToyParams(toy_strength=3.0, toy_steps=[4])
    # its range check is the method's own, with the usual one-line message naming key and value
    with pytest.raises(ConfigError, match=r"method.toy_strength=0.0 is out of range; expected a finite value > 0"):
        load_config([], ["method.name=toy", "method.toy_strength=0", OFF])
    # left out: its defaults fill in, for this method and for the others
    other = load_config([], ["method.name=neggrad", OFF])
    assert (other.method.toy_strength, other.method.toy_steps) == (1.5, [1, 2])
    # the round trip through the flattened tree (checkpoints, sweep trials) keeps it
    assert config_from_dict(cfg.to_dict()) == cfg


def test_a_key_no_method_declares_is_refused_naming_it(toy_method):
    with pytest.raises(ConfigError, match=r"unknown key method.toy_strenght in method; expected one of: .*toy_str"):
        load_config([], ["method.name=toy", "method.toy_strenght=3", OFF])


def test_settings_leave_with_their_method(monkeypatch):
    monkeypatch.setitem(METHODS._members, "toy", Toy)
    assert load_config([], ["method.name=neggrad", "method.toy_strength=2", OFF]).method.toy_strength == 2.0
    monkeypatch.delitem(METHODS._members, "toy")
    assert "toy_strength" not in method_param_classes()
    with pytest.raises(ConfigError, match="unknown key method.toy_strength"):
        load_config([], ["method.name=neggrad", "method.toy_strength=2", OFF])


@pytest.mark.parametrize("override, message", [
    ("method.temperature=0", "method.temperature=0.0 is out of range"),
    ("method.max_epochs=-1", "method.max_epochs=-1 is out of range"),
    ("method.l1_weight=-1e-3", "method.l1_weight=-0.001 is out of range"),
    ("method.rho_max=-0.1", "method.rho_max=-0.1 is out of range"),
    ("method.update_order=alternate", "method.update_order='alternate' is not valid; expected one of: joint, sequ"),
    ("method.rum_order=[low,top]", "method.rum_order='top' is not valid"),
    ("method.rum_methods=[neggrad,magic]", "unknown unlearning method 'magic'"),
    ("method.temperature=warm", "method.temperature='warm' is not a number"),
])
def test_method_settings_are_checked_by_the_method_that_declares_them(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], ["method.name=neggrad", override, OFF])
    # the shape-only loader leaves them to that layer: it knows no method
    assert config.load_config([], ["method.name=neggrad", override, OFF]).method.params
    # and the method checks its own settings however its section was built
    name, value = override.split("=", 1)
    owner = next(m for m in METHODS.names() if METHODS.get(m).params_class is method_param_classes()[name[7:]])
    if owner != "rum":  # a list value needs the loader's YAML reading
        with pytest.raises(ConfigError, match=message):
            METHODS.get(owner)(MethodConfig(name=owner, **{name[7:]: value}), OptimizerConfig(), None)


@pytest.mark.parametrize("override, needles", [
    ("data.name=mnist", ["unknown data set 'mnist'", "digits"]),
    ("model.name=alexnet", ["alexnet", "small_cnn"]),
    ("method.name=magic", ["unknown unlearning method 'magic'", "neggrad"]),
])
def test_names_are_checked_by_the_registries_not_by_config(override, needles):
    assert config.load_config([], [override, OFF])  # shape is fine
    with pytest.raises(ConfigError) as info:
        load_config([], [override, OFF])
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_spelled_out_defaults_do_not_change_the_config_hash():
    plain = load_config([], ["method.name=scrub", OFF])
    spelled = load_config([], ["method.name=scrub", "method.temperature=4.0", "method.l1_weight=5e-4",
                               "method.update_order=joint", OFF])
    changed = load_config([], ["method.name=scrub", "method.temperature=2", OFF])
    assert stable_hash(plain.to_dict()) == stable_hash(spelled.to_dict())
    assert stable_hash(plain.to_dict()) != stable_hash(changed.to_dict())
    # every registered method's setting is a flattened param, as the README's "Names users query" says
    assert set(method_param_classes()) <= {k[len("method."):] for k in plain.flat() if k.startswith("method.")}
