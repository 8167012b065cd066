"""The metric contract: a registry of metric functions over one shared evaluation context.

A metric is ``fn(ctx: EvalContext) -> MetricResult``, registered with
:func:`register_metric`. The context extracts each split's logits, labels and
penultimate features **once** (``engine.loop.predict(..., with_features=True)``)
and hands the same tensors to every metric; metrics that need the model itself
(sharpness, loss landscape) draw seeded sub-samples of a stated size.

Split names: ``retain``, ``forget``, ``test``, ``val``; a checkpoint evaluated
without a forget set has ``train`` instead of ``retain``/``forget``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from sharp_unlearn.config import build_section, parse_override
from sharp_unlearn.engine.loop import as_batch, make_loader, predict
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.registry import Registry

#: name -> MetricSpec
METRICS: Registry = Registry("metric")


# ------------------------------------------------------------------ options
@dataclass
class EvalOptions:
    """Sub-sample caps and knobs of the expensive metrics (every cap is a stated size).

    Set from the command line with ``--eval-option key=value``.
    """

    #: SVC-MIA: at most this many examples in each shadow set (in = retain, out = test). SalUn uses the
    #: whole test set (10000 on CIFAR-10); the SVC's cost grows with the square, and on these 1-10
    #: dimensional features 2500 per side moves efficacy by about a point. Set 10000 for SalUn parity.
    mia_max_shadow: int = 2500
    #: SVC-MIA: the reference rates (val, held-out retain) are scored on at most this many examples
    mia_max_baseline: int = 1000
    #: entanglement: Wasserstein score on at most this many samples per set (the definition's 1000)
    wasserstein_max_per_set: int = 1000
    #: sharpness: examples per split for the Hessian and SAM sharpness (a Hessian-vector product
    #: costs ~4 gradients, so 3 splits x ~10 products x 256 examples ~ 0.7 epochs of CIFAR-10)
    sharpness_samples: int = 256
    #: power iteration: at most this many Hessian-vector products, stop at this relative change
    hessian_iters: int = 20
    hessian_tol: float = 1e-3
    #: SAM sharpness radius (fixed for evaluation so runs trained with different rho compare)
    sam_rho: float = 0.05
    #: loss landscape: examples per split, grid points per axis, half-width of the grid
    landscape_samples: int = 500
    landscape_points: int = 21
    landscape_span: float = 1.0
    #: basin ratio: share of the grid whose loss is within this many nats of the centre loss
    basin_tolerance: float = 0.1
    #: UMAP: at most this many points per set (retain, forget)
    umap_max_per_set: int = 2000
    #: forward-pass batch size; None: 512 on CUDA, 128 on CPU (measured on CPU: a batch of 512
    #: costs 1.5-2x more per example than 128 once activations outgrow the caches)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        positive_ints = ("mia_max_shadow", "mia_max_baseline", "wasserstein_max_per_set", "sharpness_samples",
                         "hessian_iters", "landscape_samples", "umap_max_per_set", "batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"eval option {name}={value!r} is invalid; expected an integer >= 1")
        if self.landscape_points < 3:
            raise ConfigError(f"eval option landscape_points={self.landscape_points!r} is invalid; "
                              "expected an integer >= 3")
        for name in ("hessian_tol", "sam_rho", "landscape_span", "basin_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"eval option {name}={value!r} is invalid; expected a number > 0")

    @classmethod
    def from_pairs(cls, pairs: Sequence[str]) -> EvalOptions:
        """Build from ``key=value`` strings, with typed coercion and unknown-key errors."""
        values: dict[str, Any] = {}
        for text in pairs:
            keys, value = parse_override(text)
            values[".".join(keys)] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown eval option {unknown[0]!r}; expected one of: {', '.join(sorted(known))}")
        return build_section(cls, values, "eval")


# ------------------------------------------------------------------ results
class MetricValue(NamedTuple):
    metric: str
    split: str
    value: float


@dataclass
class MetricResult:
    """What one metric produced.

    ``values`` become rows of the long result table; ``headline`` holds the
    MLflow contract names (the README's "Names users query") with their headline values;
    ``details`` is JSON-serialisable extra (per feature, per class) written
    next to the table; ``artifacts`` are files (figures, grids) to log.
    """

    values: list[MetricValue] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, split: str, value: float) -> None:
        self.values.append(MetricValue(metric, split, float(value)))


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[[EvalContext], MetricResult]
    #: splits that must exist (e.g. a forget set)
    needs: tuple[str, ...] = ()
    needs_reference: bool = False
    needs_features: bool = False
    description: str = ""


def register_metric(name: str, *, needs: Sequence[str] = (), needs_reference: bool = False,
                    needs_features: bool = False, description: str = ""):
    def decorator(fn):
        METRICS.register(name)(MetricSpec(name, fn, tuple(needs), needs_reference, needs_features, description))
        return fn

    return decorator


# ------------------------------------------------------------------ shared tensors
@dataclass
class SplitOutputs:
    """One model's predictions on one split (CPU tensors), computed once and shared."""

    logits: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.double(), 1)

    @property
    def correct(self) -> torch.Tensor:
        return self.logits.argmax(1) == self.labels

    @property
    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.logits.double(), self.labels, reduction="none")

    def take(self, positions: np.ndarray | torch.Tensor) -> SplitOutputs:
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        return SplitOutputs(self.logits[pos], self.labels[pos], self.index[pos],
                            None if self.features is None else self.features[pos])


def sample_positions(n: int, cap: int | None, seed: int, salt: int = 0) -> np.ndarray:
    """Sorted seeded sub-sample of ``range(n)`` of size ``min(n, cap)`` (all of it when it fits)."""
    if cap is None or n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed * 7919 + salt * 104729 + 17)
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def _salt(text: str) -> int:
    """A stable small integer per name (Python's hash() is salted per process)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 100_003


class EvalContext:
    """The model, its splits, the optional retrained reference and the shared predictions."""

    def __init__(self, model: nn.Module, splits: Mapping[str, Dataset], *, reference: nn.Module | None = None,
                 device: torch.device | str = "cpu", options: EvalOptions | None = None,
                 out_dir: str | Path | None = None, seed: int = 0, num_classes: int | None = None):
        self.model = model
        self.splits = dict(splits)
        self.reference = reference
        self.device = torch.device(device)
        self.options = options or EvalOptions()
        self.batch_size = self.options.batch_size or (512 if self.device.type == "cuda" else 128)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.num_classes = num_classes
        self._outputs: dict[str, SplitOutputs] = {}
        self._reference_outputs: dict[str, SplitOutputs] = {}
        #: how many forward passes over each split predictions cost (the benchmark and tests read it)
        self.prediction_passes: dict[str, int] = {}

    # -- splits -------------------------------------------------------
    def has(self, split: str) -> bool:
        return split in self.splits and len(self.splits[split]) > 0

    def dataset(self, split: str) -> Dataset:
        if split not in self.splits:
            raise ConfigError(f"split {split!r} is not available here; available: {', '.join(sorted(self.splits))}")
        return self.splits[split]

    def first_available(self, *names: str) -> str | None:
        return next((n for n in names if self.has(n)), None)

    # -- shared predictions -----------------------------------------------
    def _predict(self, model: nn.Module, split: str) -> SplitOutputs:
        out = predict(model, self.dataset(split), self.batch_size, self.device, with_features=True)
        features = out.get("features")
        if features is not None and features.numel() == 0 and len(out["labels"]):
            features = None
        return SplitOutputs(out["logits"], out["labels"].long(), out["index"].long(), features)

    def outputs(self, split: str) -> SplitOutputs:
        """The evaluated model's predictions (and features) on ``split``, computed once."""
        if split not in self._outputs:
            self._outputs[split] = self._predict(self.model, split)
            self.prediction_passes[split] = self.prediction_passes.get(split, 0) + 1
        return self._outputs[split]

    def reference_outputs(self, split: str) -> SplitOutputs:
        if self.reference is None:
            raise ConfigError("this metric needs the retrained reference model; the checkpoint names none "
                              "(pass --reference CHECKPOINT)")
        if split not in self._reference_outputs:
            self._reference_outputs[split] = self._predict(self.reference, split)
        return self._reference_outputs[split]

    def features(self, split: str) -> torch.Tensor:
        feats = self.outputs(split).features
        if feats is None:
            raise ConfigError(f"model {type(self.model).__name__} has no features(x) (penultimate layer); "
                              "entanglement and UMAP need a FeatureModel (built-in, or model.name=<source>:<target> "
                              "with the head found automatically or named by model.feature_layer)")
        return feats

    # -- sub-samples for model-based metrics -----------------------------------
    def sample(self, split: str, cap: int, purpose: str) -> np.ndarray:
        """Seeded positions of at most ``cap`` examples of ``split`` (same for every run with the same seed)."""
        return sample_positions(len(self.dataset(split)), cap, self.seed, _salt(f"{purpose}:{split}"))

    def batches(self, split: str, cap: int, purpose: str) -> list:
        """A seeded sub-sample of ``split`` as a list of device batches (for repeated passes)."""
        positions = self.sample(split, cap, purpose)
        subset = Subset(self.dataset(split), positions.tolist())
        loader = make_loader(subset, self.batch_size, shuffle=False)
        return [as_batch(item).to(self.device) for item in loader]

    def artifact_path(self, name: str) -> Path | None:
        """Where a figure or table goes (``None`` when no output directory was given)."""
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name


def check_requirements(spec: MetricSpec, ctx: EvalContext) -> None:
    """A clear ConfigError when a requested metric cannot run on this context."""
    missing = [s for s in spec.needs if not ctx.has(s)]
    if missing:
        hint = (" (a pretrain checkpoint has no forget set: pass e.g. forget.kind=random forget.size=100)"
                if "forget" in missing else "")
        raise ConfigError(f"metric {spec.name!r} needs the split(s) {', '.join(missing)}, which this evaluation "
                          f"does not have{hint}")
    if spec.needs_reference and ctx.reference is None:
        raise ConfigError(f"metric {spec.name!r} needs the retrained reference model; this checkpoint names none "
                          "(pass --reference CHECKPOINT)")


class eval_mode:
    """Put a model in eval mode (BatchNorm running statistics, no dropout) and restore it after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
