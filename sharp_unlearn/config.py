"""Typed configuration: dataclass schemas, YAML + ``key=value`` loading, shape validation.

Every section validates its shape on construction (``__post_init__``): types,
ranges and choices, with a message naming the key, the value and what was
expected. Names that registries resolve (``data.name``, ``model.name``,
``method.name``) and each method's own settings are checked one layer up, by
``sharp_unlearn.validation`` (this module imports no registry), before any data
is loaded or any process group starts.

The resolved config flattens to dotted keys (``optimizer.rho``,
``method.alpha``) for MLflow params and hashes to a stable id for caches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import file_digest
from sharp_unlearn.tracking import check_experiment_name, check_uri

OPTIMIZERS = ("sgd", "adam", "adamw", "sam", "asam")
BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
SAM_SIGNS = ("min", "max")
SCHEDULES = ("cosine", "multistep", "constant")
FORGET_KINDS = ("random", "class", "memorization")
MEMORIZATION_LEVELS = ("high", "mid", "low", "mix")
DEVICES = ("auto", "cpu", "cuda")
DIST_BACKENDS = ("none", "deepspeed")
DIST_LAUNCHERS = ("ray", "torchrun")
MASK_ORDERS = ("largest", "smallest")
SAM_SUBSETS = ("random", "saliency")

#: keys added after config hashes began naming stored checkpoints, caches and run folders: while a key
#: holds the value that reproduces the earlier behaviour it is left out of every hash (hash_tree), so
#: those files stay valid; MLflow params and saved configs still show it
HASH_NEUTRAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "optimizer": {"sam_every": 1, "sam_fraction": 1.0, "sam_subset": "random"},
    "method": {"sam_sides": "both"},
    "model": {"activation_checkpointing": False},
}


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; expected one of: {', '.join(map(str, choices))}")


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    # NaN compares false with every bound, so it would pass them all; no setting here means
    # anything at +-inf (an infinite lr or rho only turns into NaN weights later), so refuse both
    bad = isinstance(value, float) and not math.isfinite(value)  # (huge ints overflow isfinite)
    if lo is not None:
        bad |= value <= lo if lo_open else value < lo
    if hi is not None:
        bad |= value >= hi if hi_open else value > hi
    if bad:
        kind = "an integer" if isinstance(value, int) else "a finite value"
        if lo is not None and hi is not None:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            expected = f"{kind} in {left}{lo}, {hi}{right}"
        elif lo is not None:
            expected = f"{kind} {'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            expected = f"{kind} {'<' if hi_open else '<='} {hi}"
        else:
            expected = kind
        raise ConfigError(f"{key}={value!r} is out of range; expected {expected}")


@dataclass
class DataConfig:
    name: str = "digits"
    #: directory holding the data set's files (CIFAR pickles, image folders, Parquet shards)
    root: str | None = None
    #: torchvision-style: fetch the files when missing (needs internet)
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = 0
    augment: bool = True
    #: fraction of training labels flipped on purpose (seeded, recorded) to create memorized examples
    label_noise: float = 0.0
    #: data-set specific options (e.g. signal_noise: d, n, patches, signal_norm, sigma_p)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"data.name={self.name!r} is not valid; expected a data set name")
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.eval_batch_size", self.eval_batch_size, 1)
        check_range("data.num_workers", self.num_workers, 0)
        check_range("data.label_noise", self.label_noise, 0.0, 1.0, hi_open=True)


@dataclass
class ModelConfig:
    """A built-in architecture (``small_cnn``, ``resnet18``, ...) or a model source:
    ``torchvision:<arch>``, ``timm:<name>``, ``hf:<local dir>``, ``python:<module>:<callable>``.

    ``options`` are the builder's keyword arguments. The fields below ``options`` serve external
    models (sources); ``weights`` also loads a state dict into a built-in one.
    """

    name: str = "small_cnn"
    options: dict[str, Any] = field(default_factory=dict)
    #: starting weights: a state-dict file, or (torchvision:) a weights name such as IMAGENET1K_V1 read
    #: from the local torch cache; a head of another size than the data's classes is replaced
    weights: str | None = None
    #: fetch a named torchvision weights file that is not cached yet (needs internet); off: never download
    download: bool = False
    #: module path of the classifier head, whose input are the penultimate features (entanglement, UMAP,
    #: MIA); None: found automatically (fc, classifier, heads.head, timm's get_classifier(), ...)
    feature_layer: str | None = None
    #: resize images to input_size x input_size before an external model; None: the size the model
    #: declares (ViTs), else the data's own
    input_size: int | None = None
    #: channels an external model takes; one-channel images are repeated to them; None: its first conv's
    input_channels: int | None = None
    #: recompute each block's activations in the backward pass instead of keeping them from the forward
    #: pass: less memory for about one more forward per step, the same gradients (models/checkpointing.py)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model.name={self.name!r} is not valid; expected a model name or <source>:<target>")
        external = ":" in self.name
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise ConfigError(f"model.weights={self.weights!r} is not valid; expected a state-dict path or a "
                              "weights name")
        for key in ("feature_layer", "input_size", "input_channels"):
            value = getattr(self, key)
            if value is not None and not external:
                raise ConfigError(f"model.{key}={value!r} applies to external models only; expected model.name="
                                  f"<source>:<target> (built-in {self.name!r} has its own features and input shape)")
        if self.feature_layer is not None and (not self.feature_layer.strip() or " " in self.feature_layer):
            raise ConfigError(f"model.feature_layer={self.feature_layer!r} is not valid; expected a module path "
                              "such as fc or heads.head")
        if self.input_size is not None:
            check_range("model.input_size", self.input_size, 1)
        if self.input_channels is not None:
            check_range("model.input_channels", self.input_channels, 1)
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(f"model.activation_checkpointing={self.activation_checkpointing!r} is not valid; "
                              "expected true or false")

    @property
    def external(self) -> bool:
        """A model from a source (torchvision:, timm:, hf:, python:), not a built-in architecture."""
        return ":" in self.name

    @property
    def pretrained(self) -> bool:
        """Training starts from given weights: pretraining this model is fine-tuning."""
        return bool(self.weights)


@dataclass
class OptimizerConfig:
    """The optimizer of the stage being run (pretraining or unlearning).

    ``sam``/``asam`` wrap ``base`` (sgd, adam, adamw); ``sign`` picks sharpness
    minimization (``min``) or maximization (``max``); ``lamb`` weighs the
    sharpness term: update gradient ``g + s*lamb*(g(w+e) - g)``.

    ``sam_every``, ``sam_fraction`` and ``sam_subset`` make every SAM pass of
    the stage cheaper (Sharp MinMax's too, whatever ``name``); their defaults
    are exact SAM (see :mod:`sharp_unlearn.optim.sam_variants`).
    """

    name: str = "sgd"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    rho: float = 0.05
    lamb: float = 1.0
    sign: str = "min"
    #: a full SAM step every `sam_every` steps; in between one pass reusing the last sharpness direction
    sam_every: int = 1
    #: share of the entries SAM's perturbation uses (1.0: all, exact SAM)
    sam_fraction: float = 1.0
    #: which entries when sam_fraction < 1: `random` (re-drawn every step, seeded) or `saliency` (largest |g|)
    sam_subset: str = "random"

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_choice("optimizer.base", self.base, BASE_OPTIMIZERS)
        check_choice("optimizer.sign", self.sign, SAM_SIGNS)
        check_range("optimizer.lr", self.lr, 0.0, lo_open=True)
        check_range("optimizer.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("optimizer.weight_decay", self.weight_decay, 0.0)
        check_range("optimizer.rho", self.rho, 0.0)
        check_range("optimizer.lamb", self.lamb, 0.0)
        check_range("optimizer.sam_every", self.sam_every, 1)
        check_range("optimizer.sam_fraction", self.sam_fraction, 0.0, 1.0, lo_open=True)
        check_choice("optimizer.sam_subset", self.sam_subset, SAM_SUBSETS)
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives lists
        if len(self.betas) != 2:
            raise ConfigError(f"optimizer.betas={list(self.betas)!r} must hold two values (beta1, beta2)")
        for i, beta in enumerate(self.betas):
            check_range(f"optimizer.betas[{i}]", beta, 0.0, 1.0, hi_open=True)

    @property
    def is_sam(self) -> bool:
        return self.name in ("sam", "asam")

    @property
    def adaptive(self) -> bool:
        return self.name == "asam"

    @property
    def base_name(self) -> str:
        """The first-order optimizer actually stepping the weights."""
        return self.base if self.is_sam else self.name

    @property
    def tag(self) -> str:
        """The MLflow ``optimizer`` tag value (the README's "Names users query")."""
        if not self.is_sam:
            return self.name
        return self.name if self.sign == "min" else f"{self.name}-max"


@dataclass
class TrainConfig:
    epochs: int = 20
    schedule: str = "cosine"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_accum: int = 1
    #: max gradient norm; 0 disables clipping
    grad_clip: float = 0.0
    #: evaluate val accuracy every N epochs (0: only at the end)
    eval_every: int = 1
    #: keep a checkpoint every N epochs so an interrupted run resumes (0: only at the end)
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, 0)
        check_choice("train.schedule", self.schedule, SCHEDULES)
        check_range("train.warmup_epochs", self.warmup_epochs, 0)
        check_range("train.grad_accum", self.grad_accum, 1)
        check_range("train.grad_clip", self.grad_clip, 0.0)
        check_range("train.gamma", self.gamma, 0.0, lo_open=True)
        check_range("train.eval_every", self.eval_every, 0)
        check_range("train.checkpoint_every", self.checkpoint_every, 0)
        self.milestones = [int(m) for m in self.milestones]


@dataclass
class ForgetConfig:
    """Which training examples to forget.

    ``random``: ``size`` examples (or ``fraction`` of the training set);
    ``class``: every example of ``classes``; ``memorization``: ``size`` examples
    at ``level`` of the ``scores`` (a ``.npz`` with ``tr_mem``, a Parquet table
    with ``index``/``score``, or a proxy name: ``proxy:loss``, ``proxy:confidence``,
    ``flipped`` for the recorded label flips).
    """

    kind: str = "random"
    size: int | None = None
    fraction: float | None = None
    classes: list[int] = field(default_factory=list)
    level: str = "high"
    scores: str = "proxy:loss"

    def __post_init__(self) -> None:
        check_choice("forget.kind", self.kind, FORGET_KINDS)
        check_choice("forget.level", self.level, MEMORIZATION_LEVELS)
        if self.size is not None:
            check_range("forget.size", self.size, 1)
        if self.fraction is not None:
            check_range("forget.fraction", self.fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.kind in ("random", "memorization") and self.size is None and self.fraction is None:
            raise ConfigError(f"forget.kind={self.kind!r} needs forget.size or forget.fraction")
        if self.kind == "class" and not self.classes:
            raise ConfigError("forget.kind='class' needs forget.classes (a list of class ids), got []")
        self.classes = [int(c) for c in self.classes]

    @property
    def label(self) -> str:
        """The MLflow ``forget_set`` tag, e.g. ``memorization-high-300``."""
        if self.kind == "class":
            return "class-" + "+".join(map(str, self.classes))
        amount = self.size if self.size is not None else f"{self.fraction:g}"
        if self.kind == "random":
            return f"random-{amount}"
        return f"memorization-{self.level}-{amount}"


@dataclass(init=False)
class MethodConfig:
    """The unlearning method: the settings the framework reads for every method, and ``params``.

    ``params`` holds the method-specific settings (``l1_weight``, ``temperature``,
    ``rho_max``...) under their own keys: in YAML, on the command line and in the
    flattened config they sit beside the shared ones (``method.l1_weight``). Each
    method declares their types, defaults and ranges next to its code (its
    ``params_class``); ``sharp_unlearn.validation`` checks them and fills in the
    defaults. Read one as an attribute (``cfg.method.l1_weight``) or from ``params``.
    """

    name: str = "neggrad"
    epochs: int = 5
    #: retain weight: NegGrad+ and Sharp MinMax optimize alpha*L_R - (1-alpha)*L_F
    alpha: float = 0.9
    #: saliency mask: share of parameters (largest |grad L_F|) SalUn / Sharp MinMax may change
    mask_fraction: float = 0.5
    #: saliency masks (SalUn, Sharp MinMax, `sharp-unlearn mask`): keep the `largest` or `smallest`
    #: mask_fraction of |grad L_F| (the paper's released generator keeps the smallest)
    mask_order: str = "largest"
    #: path to a saved mask (from `sharp-unlearn mask`); None computes it
    mask_path: str | None = None
    #: method-specific settings by key, as given (shape-checked by the methods that declare them)
    params: dict[str, Any] = field(default_factory=dict)

    #: the field whose mapping takes every key that is not a field (build_section, to_dict)
    open_params_field = "params"

    # written out (not generated) so that method-specific settings can be passed by key,
    # MethodConfig(name="scrub", temperature=2.0), as they are written in YAML
    def __init__(self, name: str = "neggrad", epochs: int = 5, alpha: float = 0.9, mask_fraction: float = 0.5,
                 mask_order: str = "largest", mask_path: str | None = None, params: dict[str, Any] | None = None,
                 **method_params: Any) -> None:
        self.name = name
        self.epochs = epochs
        self.alpha = alpha
        self.mask_fraction = mask_fraction
        self.mask_order = mask_order
        self.mask_path = mask_path
        self.params = {**(params or {}), **method_params}
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"method.name={self.name!r} is not valid; expected an unlearning method name")
        check_range("method.epochs", self.epochs, 0)
        check_range("method.alpha", self.alpha, 0.0, 1.0)
        check_range("method.mask_fraction", self.mask_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_choice("method.mask_order", self.mask_order, MASK_ORDERS)

    def __getattr__(self, key: str) -> Any:
        # only reached for names that are not fields: a method-specific setting by its key
        params = self.__dict__.get("params")
        if params is not None and key in params:
            return params[key]
        raise AttributeError(f"method section has no setting {key!r} (method {self.__dict__.get('name')!r})")


@dataclass
class DistributedConfig:
    backend: str = "none"
    zero_stage: int = 0
    num_workers: int = 1
    launcher: str = "ray"
    use_gpu: bool = False
    #: overrides DeepSpeed JSON (path); default: sharp_unlearn/configs/deepspeed/zero{stage}.json
    deepspeed_config: str | None = None
    #: seconds a collective may wait before a dead peer fails the run
    timeout_s: int = 120
    #: Ray cluster to run on (launcher=ray), e.g. "ray://head:10001" or "auto"; None: $RAY_ADDRESS or a local Ray
    address: str | None = None

    def __post_init__(self) -> None:
        check_choice("distributed.backend", self.backend, DIST_BACKENDS)
        check_choice("distributed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_range("distributed.num_workers", self.num_workers, 1)
        check_choice("distributed.launcher", self.launcher, DIST_LAUNCHERS)
        check_range("distributed.timeout_s", self.timeout_s, 1)


@dataclass
class TrackingConfig:
    enabled: bool = True
    #: None: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db in the working directory
    uri: str | None = None
    experiment: str = "sharp-unlearn"
    #: checkpoints above this size are logged as a path reference, not copied
    max_artifact_mb: float = 200.0
    #: also log trained models as MLflow PyTorch models ("Logged models" in the UI, registrable,
    #: loadable as runs:/<id>/model); a few seconds per run
    log_models: bool = True

    def __post_init__(self) -> None:
        check_range("tracking.max_artifact_mb", self.max_artifact_mb, 0.0)
        if self.uri:
            check_uri(self.uri)
        check_experiment_name(self.experiment)


@dataclass
class ExperimentConfig:
    seed: int = 0
    output_dir: str = "runs"
    device: str = "auto"
    #: deterministic kernels and a fixed CPU thread count (1 unless ``threads`` is set): with the same
    #: seed, threads, device and versions a run is bit-identical; off, torch picks threads and kernels
    deterministic: bool = False
    #: CPU threads for torch (None: torch's default, from OMP_NUM_THREADS or the cores)
    threads: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    forget: ForgetConfig | None = None
    method: MethodConfig | None = None
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        # numpy's legacy seeding (and DataLoader workers) take 32-bit seeds; larger ones fail mid-run
        check_range("seed", self.seed, 0, 2**32 - 1)
        if self.threads is not None:
            check_range("threads", self.threads, 1)

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        if tree["method"] is not None:  # method-specific settings sit beside the shared ones, as in YAML
            tree["method"].update(tree["method"].pop(MethodConfig.open_params_field))
        return tree

    def flat(self) -> dict[str, Any]:
        """Dotted keys for MLflow params (``optimizer.rho``, ``method.alpha``)."""
        return flatten(self.to_dict())

    def hash_tree(self) -> dict[str, Any]:
        """``to_dict()`` without the keys of ``HASH_NEUTRAL_DEFAULTS`` that hold their neutral value:
        what config hashes are computed from."""
        tree = self.to_dict()
        for section, neutral in HASH_NEUTRAL_DEFAULTS.items():
            values = tree.get(section)
            if isinstance(values, dict):
                tree[section] = {k: v for k, v in values.items() if not (k in neutral and v == neutral[k])}
        return tree

    def training_hash(self) -> str:
        """Hash of what determines a trained model: data, model, optimizer, schedule, seed.

        Tracking, output paths and device do not change the result and are left out. A
        ``model.weights`` file enters by its content (SHA-256), not its path: moving the file keeps
        cached stages, overwriting it with other weights retrains them. A weights name (torchvision's
        ``IMAGENET1K_V1``) or a file that no longer exists enters as written.
        """
        keep = {k: v for k, v in self.hash_tree().items()
                if k in ("seed", "data", "model", "optimizer", "train")}
        keep["data"] = {k: v for k, v in keep["data"].items()
                        if k not in ("num_workers", "eval_batch_size", "download")}
        keep["train"] = {k: v for k, v in keep["train"].items()
                         if k not in ("eval_every", "checkpoint_every")}
        # recomputing activations changes memory and time, not the trained model (like device)
        keep["model"].pop("activation_checkpointing", None)
        weights = self.model.weights
        if weights and Path(weights).expanduser().is_file():
            keep["model"]["weights"] = {"sha256": file_digest(weights)}
        return stable_hash(keep)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def stable_hash(obj: Any, length: int = 12) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "options":
            out.update(flatten(value, name + "."))
        elif isinstance(value, dict):
            for k, v in value.items():
                out[f"{name}.{k}"] = v
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- building
def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if dataclasses.is_dataclass(annotation):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build_section(annotation, value, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `key=1` reaches here as YAML's int 1
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean; expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list")
        item_type = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item_type) if item_type is not Any else v
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} is not a mapping")
        return dict(value)
    return value


def build_section(cls: type, values: dict[str, Any], prefix: str = ""):
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    open_field = getattr(cls, "open_params_field", None)
    if open_field is not None:
        # keys this schema does not declare are kept, as given, for the layer that knows them
        known.discard(open_field)
        values = {**{k: v for k, v in values.items() if k in known},
                  open_field: {k: v for k, v in values.items() if k not in known}}
    unknown = sorted(set(values) - known - {open_field})
    if unknown:
        where = prefix or "config"
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]!s} in {where}; "
            f"expected one of: {', '.join(sorted(known))}"
        )
    kwargs = {name: _coerce(f"{prefix}.{name}" if prefix else name, value, hints[name])
              for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is malformed; expected key=value (e.g. optimizer.rho=0.1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``tree`` with each ``key.path=value`` override merged in, in order (YAML-typed values)."""
    for text in overrides:
        keys, value = parse_override(text)
        update: dict[str, Any] = {}
        node = update
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = value
        tree = merge(tree, update)
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def packaged_config(name: str) -> Path:
    return Path(__file__).parent / "configs" / name


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        # allow bare names of packaged experiment files: `--config digits_small_cnn`
        candidate = packaged_config("experiments") / (path.name if path.suffix else path.name + ".yaml")
        if candidate.exists():
            path = candidate
        else:
            raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; expected a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); "
                          "expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Merge ``base``, then each YAML file, then ``key=value`` overrides; validate."""
    tree: dict[str, Any] = dict(base or {})
    for path in paths:
        data = load_yaml(path)
        check_not_grid_spec(path, data)
        tree = merge(tree, data)
    return build_section(ExperimentConfig, apply_overrides(tree, overrides))


#: packaged grid specs and the command line that runs each
GRID_SPEC_COMMANDS = {"demo_digits": "sharp-unlearn demo --spec demo_digits",
                      "reproduce_digits": "sharp-unlearn reproduce table"}


def check_not_grid_spec(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Refuse a grid spec (``base`` + ``pretrain_optimizers``: the demo's and ``reproduce``'s format)
    given as a run config, naming the command it belongs to (it would fail as "unknown key base")."""
    if "base" not in data or "pretrain_optimizers" not in data:
        return
    name = Path(path).stem
    command = GRID_SPEC_COMMANDS.get(name, f"sharp-unlearn demo --spec {path}")
    raise ConfigError(f"--config {str(path)!r} is a grid spec of the demo/reproduce commands (run it with: "
                      f"{command}), not a run config; expected a YAML file with sections such as "
                      "data, model, optimizer, train (or key=value overrides)")


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    return build_section(ExperimentConfig, tree)
