"""Configs: YAML + overrides, type coercion, errors naming the key, the training hash."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sharp_unlearn import files
from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.validation import load_config

OFF = "tracking.enabled=false"


def write(path, text: str):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ merging
def test_yaml_files_then_overrides_merge_in_order(tmp_path):
    base = write(tmp_path / "base.yaml", """
optimizer: {name: sam, rho: 0.1, lr: 0.2, momentum: 0.5}
train: {epochs: 3, schedule: multistep, milestones: [1, 2]}
data: {batch_size: 32}
""")
    later = write(tmp_path / "later.yaml", "optimizer: {rho: 0.2}\ntrain: {epochs: 5}\n")
    cfg = load_config([base, later], ["optimizer.rho=0.3", OFF])
    assert cfg.optimizer.rho == 0.3  # override beats both files
    assert cfg.train.epochs == 5  # the later file beats the earlier one
    assert cfg.optimizer.name == "sam" and cfg.optimizer.lr == 0.2 and cfg.optimizer.momentum == 0.5  # siblings kept
    assert cfg.train.schedule == "multistep" and cfg.train.milestones == [1, 2]
    assert cfg.data.batch_size == 32
    assert cfg.optimizer.weight_decay == ExperimentConfig().optimizer.weight_decay  # untouched default
    assert cfg.tracking.enabled is False


def test_options_mapping_is_replaced_not_merged(tmp_path):
    first = write(tmp_path / "a.yaml", "model: {name: small_cnn, options: {width: 4, feature_dim: 8}}\n")
    cfg = load_config([first], ["model.options={width: 6}", OFF])
    assert cfg.model.options == {"width": 6}  # a model's options are one unit
    cfg = load_config([first], ["model.options.width=6", OFF])
    assert cfg.model.options == {"width": 6}


def test_empty_yaml_and_null_sections(tmp_path):
    empty = write(tmp_path / "empty.yaml", "")
    assert load_config([empty], [OFF]).optimizer == ExperimentConfig().optimizer
    cfg = load_config([], ["method.name=neggrad", "method=null", OFF])
    assert cfg.method is None


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config([], ["optimizer.name=asam", "optimizer.betas=[0.8, 0.95]", "train.milestones=3,6", OFF,
                           "forget.kind=class", "forget.classes=[1, 7]"])
    saved = write(tmp_path / "resolved.yaml", cfg.to_yaml())
    again = load_config([saved])
    assert again == cfg
    assert again.flat()["optimizer.betas"] == (0.8, 0.95)


# ------------------------------------------------------------------ coercion
@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("yes", True), ("on", True), ("1", True),
    ("false", False), ("no", False), ("off", False), ("0", False),
])
def test_bool_strings(text, expected, tmp_path):
    assert load_config([], [f"data.augment={text}", OFF]).data.augment is expected
    # the same words quoted in YAML are strings there, and still coerce
    path = write(tmp_path / "b.yaml", f"data: {{augment: '{text}'}}\n")
    assert load_config([path], [OFF]).data.augment is expected


@pytest.mark.parametrize("override, attr, expected", [
    ("train.milestones=[5, 10]", ("train", "milestones"), [5, 10]),
    ("train.milestones=5,10", ("train", "milestones"), [5, 10]),
    ("train.milestones=[]", ("train", "milestones"), []),
    ("optimizer.betas=0.8,0.99", ("optimizer", "betas"), (0.8, 0.99)),
    ("optimizer.betas=[0.5, 0.9]", ("optimizer", "betas"), (0.5, 0.9)),
    ("train.epochs='7'", ("train", "epochs"), 7),
    ("optimizer.lr=1e-3", ("optimizer", "lr"), 1e-3),  # YAML 1.1 reads this as a string
    ("optimizer.lr=2", ("optimizer", "lr"), 2.0),
    ("data.root=null", ("data", "root"), None),
    ("data.root=~/data", ("data", "root"), "~/data"),
    ("forget.size=none", ("forget", "size"), None),
])
def test_type_coercion(override, attr, expected):
    extra = ["forget.fraction=0.1"] if override.startswith("forget.") else []
    cfg = load_config([], [override, OFF, *extra])
    value = getattr(getattr(cfg, attr[0]), attr[1])
    assert value == expected and type(value) is type(expected)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("override, needles", [
    ("optimizer.foo=1", ["optimizer.foo", "rho", "lamb"]),
    ("bogus=1", ["bogus", "optimizer", "train"]),
    ("train.epochs=2.5", ["train.epochs", "2.5", "integer"]),
    ("train.epochs=abc", ["train.epochs", "abc", "integer"]),
    ("optimizer.lr=fast", ["optimizer.lr", "fast", "number"]),
    ("data.augment=maybe", ["data.augment", "maybe", "true or false"]),
    ("data.augment=2", ["data.augment", "2"]),
    ("optimizer.betas=0.9", ["optimizer.betas", "list"]),
    ("optimizer=5", ["optimizer", "mapping"]),
    ("train.milestones=[a]", ["train.milestones[0]", "a"]),
    ("optimizer.name=lbfgs", ["optimizer.name", "lbfgs", "sgd, adam, adamw, sam, asam"]),
    ("optimizer.sign=up", ["optimizer.sign", "up", "min, max"]),
    ("train.schedule=linear", ["train.schedule", "linear", "cosine"]),
    ("device=tpu", ["device", "tpu", "auto, cpu, cuda"]),
    ("data.name=mnist", ["mnist", "digits"]),
    ("model.name=alexnet", ["alexnet", "small_cnn"]),
    ("method.name=magic", ["magic", "neggrad"]),
])
def test_bad_values_name_the_key(override, needles):
    with pytest.raises(ConfigError) as info:
        load_config([], [override, OFF])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("override, needle", [
    ("optimizer.rho=-0.1", "optimizer.rho=-0.1"),
    ("optimizer.rho=nan", "optimizer.rho=nan"),
    ("optimizer.lr=.nan", "optimizer.lr=nan"),
    ("optimizer.lr=0", "optimizer.lr=0.0"),
    ("optimizer.lamb=-1", "optimizer.lamb=-1.0"),
    ("optimizer.momentum=1", "optimizer.momentum=1.0"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.label_noise=1", "data.label_noise=1.0"),
    ("train.grad_accum=0", "train.grad_accum=0"),
    ("seed=-1", "seed=-1"),
    ("method.alpha=1.5", "method.alpha=1.5"),
    ("method.mask_fraction=1", "method.mask_fraction=1.0"),
    ("method.mask_fraction=0", "method.mask_fraction=0.0"),
    ("forget.fraction=1.2", "forget.fraction=1.2"),
])
def test_out_of_range_values(override, needle):
    with pytest.raises(ConfigError, match="out of range") as info:
        load_config([], [override, OFF])
    assert needle in str(info.value)


def test_boundaries_that_are_allowed():
    cfg = load_config([], ["optimizer.rho=0", "method.alpha=0", "method.alpha=1", "optimizer.lamb=0", OFF])
    assert cfg.optimizer.rho == 0.0 and cfg.method.alpha == 1.0 and cfg.optimizer.lamb == 0.0


@pytest.mark.parametrize("override", ["foo", "=3", "optimizer..rho=1", ".rho=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="override"):
        load_config([], [override])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(tmp_path / "missing.yaml")])
    broken = write(tmp_path / "broken.yaml", "optimizer: {rho: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML") as info:
        load_config([broken])
    assert "\n" not in str(info.value)
    listy = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config([listy])
    nested = write(tmp_path / "nested.yaml", "train:\n  epochs: 2\n  warmpu_epochs: 1\n")
    with pytest.raises(ConfigError, match="train.warmpu_epochs"):
        load_config([nested])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="forget.size or forget.fraction"):
        load_config([], ["forget.kind=random", OFF])
    with pytest.raises(ConfigError, match="forget.classes"):
        load_config([], ["forget.kind=class", OFF])


# ------------------------------------------------------------------ the training hash
def test_training_hash_ignores_what_does_not_change_the_model(tmp_path):
    ref = load_config([], [OFF]).training_hash()
    same = [
        ["tracking.enabled=true", "tracking.uri=sqlite:///x.db", "tracking.experiment=other"],
        [f"output_dir={tmp_path}"],
        ["device=cpu"],
        ["data.num_workers=2", "data.eval_batch_size=64"],
        ["train.eval_every=5", "train.checkpoint_every=0"],
        ["forget.kind=random", "forget.size=10", "method.name=neggrad"],
    ]
    for overrides in same:
        assert load_config([], [OFF, *overrides]).training_hash() == ref, overrides
    different = [["seed=1"], ["optimizer.rho=0.1"], ["optimizer.name=sam"], ["optimizer.lr=0.01"],
                 ["train.epochs=3"], ["model.options={width: 8}"], ["data.label_noise=0.05"], ["data.batch_size=32"]]
    hashes = {load_config([], [OFF, *overrides]).training_hash() for overrides in different}
    assert ref not in hashes and len(hashes) == len(different)


def test_training_hash_follows_the_weights_file_content_not_its_path(tmp_path):
    def hash_with(weights) -> str:
        return load_config([], [OFF, f"model.weights={weights}"]).training_hash()

    original = tmp_path / "a" / "start.pt"
    original.parent.mkdir()
    original.write_bytes(b"weights, first version")
    ref = hash_with(original)
    assert ref != load_config([], [OFF]).training_hash()
    copy = tmp_path / "b" / "renamed.pth"  # the same bytes elsewhere under another name
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    assert hash_with(copy) == ref
    # other bytes of the same size at the same path, with a later mtime (what rewriting the file gives)
    original.write_bytes(b"weights, other version")
    stat = original.stat()
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = hash_with(original)
    assert changed != ref
    # a weights name is no file: it enters as written
    assert hash_with("IMAGENET1K_V1") != hash_with("IMAGENET1K_V2")


def test_weights_digest_is_read_once_per_file_version(tmp_path, monkeypatch):
    reads = []

    def counting_open(path, *args, **kwargs):
        reads.append(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", counting_open, raising=False)  # shadows the builtin in files only
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x" * 100)
    cfg = load_config([], [OFF, f"model.weights={weights}"])
    assert cfg.training_hash() == cfg.training_hash() == cfg.training_hash()
    assert len(reads) == 1
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again
    cfg.training_hash()
    assert len(reads) == 2


def test_activation_checkpointing_leaves_config_hashes_alone():
    plain = load_config([], [OFF])
    checkpointed = load_config([], [OFF, "model.activation_checkpointing=true"])
    # off (the default) it is left out of every hash: unlearning folders and caches named before it existed stay valid
    assert "activation_checkpointing" not in plain.hash_tree()["model"]
    assert "activation_checkpointing" in checkpointed.hash_tree()["model"]
    assert checkpointed.training_hash() == plain.training_hash()  # memory and time only: cached stages are reused


def test_training_hash_is_stable_across_processes():
    script = ("from sharp_unlearn.config import load_config;"
              "print(load_config([], ['optimizer.name=sam', 'model.options={b: 1, a: 2}']).training_hash())")
    env = dict(os.environ, PYTHONHASHSEED="4242")  # another string-hash seed than this process
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    here = load_config([], ["optimizer.name=sam", "model.options={a: 2, b: 1}"]).training_hash()
    assert proc.stdout.strip() == here  # independent of hash seeds and of key order
    assert re.fullmatch(r"[0-9a-f]{12}", here), here  # 12 lowercase hex digits: a file-name-safe, fixed-size key
