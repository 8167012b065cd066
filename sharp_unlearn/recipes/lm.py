"""Language-model unlearning on question-answer data, end to end, through the one training loop.

Stages (every one a :class:`~sharp_unlearn.engine.loop.Trainer` running
:class:`~sharp_unlearn.engine.objective.Phase` objects, as for images):

* ``pretrain``: fine-tune on every trained subject plus the world rows (the model memorises them);
* ``retrain``: the same from the same initial weights on the retain subjects and world rows only
  (the reference an unlearned model should become);
* unlearning: a registered method (``grad_ascent``, ``neggrad``, ``npo``, ``sharp_minmax``...)
  from the pretrained weights, with AdamW or SAM/ASAM (base AdamW).

:func:`run_lm_demo` runs them all on the embedded fictitious-people default and returns one row
per model with the metrics of :mod:`sharp_unlearn.metrics.lm_unlearning`, the do-nothing
(``original``) and ``retrain`` rows included.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from sharp_unlearn.config import ExperimentConfig, MethodConfig, OptimizerConfig, TrackingConfig, check_range
from sharp_unlearn.data.qa import QASplit, generate_people, load_qa_rows, split_by_subject, world_rows
from sharp_unlearn.engine.determinism import apply_determinism
from sharp_unlearn.engine.loop import Trainer, make_loader
from sharp_unlearn.engine.objective import Objective, Phase
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.losses import cross_entropy
from sharp_unlearn.markdown import fmt_result, markdown_table
from sharp_unlearn.methods import METHODS, UnlearnContext
from sharp_unlearn.metrics.lm_unlearning import against_reference, evaluate_lm
from sharp_unlearn.models.causal_lm import QADataset, WordTokenizer, load_hf_causal_lm, tiny_gpt
from sharp_unlearn.optim.factory import build_base_optimizer, sam_spec
from sharp_unlearn.tracking import tracked_run

TABLE_COLUMNS = ["method", "unlearn_opt", "forget_quality", "model_utility", "forget_rouge_l", "retain_rouge_l",
                 "mia_auc_loss", "mia_auc_zlib", "mia_auc_mink", "tow", "forget_gap", "wall_seconds"]

#: method -> method-section settings of the demo, and ``lr`` where it differs from ``unlearn_lr``
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "grad_ascent": {},
    "neggrad": {"alpha": 0.5},
    "npo": {"alpha": 0.5, "beta": 0.1},
    # measured on the default (seed 0): at lr 1e-3 both sides' SAM steps wreck the retain answers (model
    # utility 0.05, retain ROUGE-L 0.14); at 3e-4 utility 0.34, forget quality 0.27. Alpha does not
    # matter under Adam here: the two sides move disjoint entries, and Adam is scale-free per entry
    "sharp_minmax": {"alpha": 0.5, "mask_fraction": 0.5, "lr": 3e-4},
    # SCRUB's defaults (temperature 4, max phases in the first 2 epochs); in the default demo at load 12-17
    # on 2 cores its rows took 4.4 s (AdamW) / 6.4 s (SAM) wall, NPO's 7.9 s / 19.3 s; the whole demo
    # 42 s CPU with it (36 s before)
    "scrub": {},
}


@dataclass
class LMDemoSettings:
    """The LM demo's settings (``key=value`` overrides on the command line)."""

    seed: int = 0
    #: fictitious people of the embedded default (ignored with ``data_path``)
    subjects: int = 40
    #: a .jsonl / .parquet file of question-answer rows instead of the embedded default
    data_path: str | None = None
    #: share of the trained subjects forgotten (0.01 / 0.05 / 0.10 in the field)
    forget_size: float = 0.1
    #: share of all subjects never trained on (membership-inference non-members)
    heldout_fraction: float = 0.1
    #: ``tiny_gpt`` (built here from a GPT2Config) or ``hf:<local dir>``
    model_name: str = "tiny_gpt"
    max_length: int = 24
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    batch_size: int = 64
    pretrain_epochs: int = 40
    pretrain_lr: float = 5e-3
    unlearn_epochs: int = 5
    unlearn_lr: float = 1e-3
    rho: float = 0.05
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "sam"])
    #: CPU threads for torch (None: torch's default); 1 is fastest on a busy machine with few cores
    threads: int | None = None

    def __post_init__(self) -> None:
        check_range("forget_size", self.forget_size, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("pretrain_epochs", self.pretrain_epochs, 1)
        check_range("unlearn_epochs", self.unlearn_epochs, 1)
        for name in self.optimizers:
            if name not in ("adamw", "sam", "asam"):
                raise ConfigError(f"optimizers contains {name!r}; expected adamw, sam or asam")


def settings_from_overrides(overrides: Sequence[str]) -> LMDemoSettings:
    """``key=value`` strings onto the defaults, typed like the defaults (lists comma-separated)."""
    defaults = asdict(LMDemoSettings())
    given: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = {"forget.size": "forget_size", "model.name": "model_name", "data.path": "data_path"}.get(key, key)
        if not sep or key not in defaults:
            raise ConfigError(f"LM demo override {item!r}; expected key=value with a key among {sorted(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                given[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(default, list):
                given[key] = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(default, int) or key == "threads":
                given[key] = int(value)
            elif isinstance(default, float):
                given[key] = float(value)
            else:
                given[key] = None if value.lower() in ("", "none", "null") else value
        except ValueError:
            raise ConfigError(f"LM demo override {item!r}: {value!r} is not a {type(default).__name__}") from None
    return LMDemoSettings(**given)


@dataclass
class LMSetup:
    split: QASplit
    tokenizer: Any
    initial: nn.Module
    train: QADataset
    retain: QADataset
    forget: QADataset

    @property
    def eval_splits(self) -> dict[str, list]:
        return {"forget": self.split.forget, "retain": self.split.retain, "heldout": self.split.heldout,
                "world": self.split.world}


def build_setup(settings: LMDemoSettings) -> LMSetup:
    """Data, split, tokenizer, the initial model and the training tensors (retain includes the world rows)."""
    rows = load_qa_rows(settings.data_path) if settings.data_path else generate_people(settings.subjects, settings.seed)
    split = split_by_subject(rows, world_rows(), forget_fraction=settings.forget_size,
                             heldout_fraction=settings.heldout_fraction, seed=settings.seed)
    if settings.model_name == "tiny_gpt":
        texts = [t for r in [*rows, *split.world]
                 for t in (r.question, r.answer, r.paraphrased_answer or "", *r.perturbed_answers)]
        tokenizer = WordTokenizer(texts)
        model = tiny_gpt(len(tokenizer), n_positions=settings.max_length, n_embd=settings.n_embd,
                         n_layer=settings.n_layer, n_head=settings.n_head, seed=settings.seed)
    else:
        model, tokenizer = load_hf_causal_lm(settings.model_name)

    def encode(part):
        return QADataset.from_rows(part, tokenizer, settings.max_length)

    retain = QADataset.concat([encode(split.retain), encode(split.world)])
    forget = encode(split.forget)
    return LMSetup(split, tokenizer, model, QADataset.concat([retain, forget]), retain, forget)


def optimizer_config(name: str, lr: float, rho: float) -> OptimizerConfig:
    # no weight decay: it would pull the memorised answers of every subject, not only the forgotten ones
    return OptimizerConfig(name=name, base="adamw", lr=lr, weight_decay=0.0, rho=rho)


def streams_for(datasets: dict[str, QADataset], batch_size: int, seed: int, epoch: int):
    return {name: (lambda passes, data=data, salt=salt: make_loader(data, batch_size, shuffle=True, seed=seed,
                                                                   epoch=epoch * 1000 + passes, salt=salt))
            for salt, (name, data) in enumerate(datasets.items())}


def train_lm(model: nn.Module, data: QADataset, *, epochs: int, optimizer: OptimizerConfig, batch_size: int,
             seed: int) -> nn.Module:
    """Fine-tune on ``data`` (answer-only cross-entropy): the pretrain and retrain stages."""
    trainer = Trainer(model, build_base_optimizer(model.parameters(), optimizer))
    phase = Phase("train", [Objective("train", "train", cross_entropy, sam=sam_spec(optimizer))])
    for epoch in range(epochs):
        trainer.run_phase(phase, streams_for({"train": data}, batch_size, seed, epoch))
    return model.eval()


def unlearn_lm(model: nn.Module, setup: LMSetup, method_name: str, method_settings: dict[str, Any], *,
               optimizer: OptimizerConfig, epochs: int, batch_size: int, seed: int,
               on_epoch_end: Callable[[int, nn.Module], None] | None = None) -> tuple[nn.Module, str]:
    """A registered unlearning method's phases from ``model``'s weights, ``epochs`` passes; the model and
    the method's optimizer tag (Sharp MinMax's sides use SAM whatever the base optimizer: ``sam-min/sam-max``).
    ``on_epoch_end(epoch, model)`` runs after each pass (1-based epoch; a sweep trial reports there)."""
    method_cfg = MethodConfig(name=method_name, epochs=epochs, **method_settings)
    method = METHODS.get(method_name)(method_cfg, optimizer, sam_spec(optimizer))
    ctx = UnlearnContext(model=model, retain=setup.retain, forget=setup.forget, num_classes=len(setup.tokenizer),
                         device=torch.device("cpu"), seed=seed, batch_size=batch_size, extras={})
    extra = method.prepare(ctx) or {}
    datasets = {"retain": setup.retain, "forget": setup.forget, **extra}
    trainer = Trainer(model, build_base_optimizer(model.parameters(), optimizer))
    for epoch in range(epochs):
        for phase in method.phases(epoch):
            trainer.run_phase(phase, streams_for(datasets, batch_size, seed, epoch))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model.eval())
    return model.eval(), method.optimizer_tag


@dataclass
class LMDemoResult:
    rows: list[dict[str, Any]]
    markdown_path: Path
    settings: LMDemoSettings


def run_lm_demo(settings: LMDemoSettings, *, methods: dict[str, dict[str, Any]] | None = None,
                output_dir: str = "runs", tracking: dict[str, Any] | None = None,
                log=print) -> LMDemoResult:
    """Pretrain, retrain, every method x optimizer; one row per model (original and retrain included)."""
    methods = DEFAULT_METHODS if methods is None else methods
    unknown = sorted(set(methods) - set(METHODS.names()))
    if unknown:
        raise ConfigError(f"methods {unknown} are not registered; expected some of {METHODS.names()}")
    apply_determinism(ExperimentConfig(threads=settings.threads))
    torch.manual_seed(settings.seed)
    setup = build_setup(settings)
    adamw = optimizer_config("adamw", settings.pretrain_lr, settings.rho)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tracked_parent(settings, output_dir, tracking) as parent:
        timer = time.perf_counter()
        pretrained = train_lm(copy.deepcopy(setup.initial), setup.train, epochs=settings.pretrain_epochs,
                              optimizer=adamw, batch_size=settings.batch_size, seed=settings.seed)
        pretrain_seconds = time.perf_counter() - timer
        timer = time.perf_counter()
        reference = train_lm(copy.deepcopy(setup.initial), setup.retain, epochs=settings.pretrain_epochs,
                             optimizer=adamw, batch_size=settings.batch_size, seed=settings.seed)
        retrain_seconds = time.perf_counter() - timer
        reference_metrics, reference_ratios = evaluate_lm(reference, setup.tokenizer, setup.eval_splits,
                                                          settings.max_length)

        def add_row(model: nn.Module, method: str, opt: str, seconds: float, label: str | None = None) -> None:
            metrics, ratios = evaluate_lm(model, setup.tokenizer, setup.eval_splits, settings.max_length)
            metrics.update(against_reference(metrics, ratios, reference_metrics, reference_ratios))
            row = {"method": method, "unlearn_opt": label or opt, **metrics, "wall_seconds": seconds}
            rows.append(row)
            parent.log_metrics({f"{method}.{opt}.{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and np.isfinite(v)})
            log(f"  {method:<13} {opt:<6} forget_quality={metrics['forget_quality']:.3g} "
                f"model_utility={metrics['model_utility']:.3f} forget_rouge_l={metrics['forget_rouge_l']:.3f} "
                f"({seconds:.1f}s)")

        add_row(pretrained, "original", "-", pretrain_seconds)
        add_row(reference, "retrain", "adamw", retrain_seconds)
        for method_name, method_settings in methods.items():
            for opt in settings.optimizers:
                timer = time.perf_counter()
                method_options = {k: v for k, v in method_settings.items() if k != "lr"}
                lr = float(method_settings.get("lr", settings.unlearn_lr))
                model, tag = unlearn_lm(copy.deepcopy(pretrained), setup, method_name, method_options,
                                        optimizer=optimizer_config(opt, lr, settings.rho),
                                        epochs=settings.unlearn_epochs, batch_size=settings.batch_size,
                                        seed=settings.seed)
                # the row names the optimizer the method really ran (the base optimizer when it differs)
                label = tag if tag == opt else f"{tag} ({opt})"
                add_row(model, method_name, opt, time.perf_counter() - timer, label)
        markdown_path = out / "lm_demo_results.md"
        markdown_path.write_text(markdown_table(TABLE_COLUMNS, rows, cell=fmt_result))
        parent.log_preview_table(rows, "tables/lm_demo.json")
        parent.log_artifact(markdown_path, "results")
    return LMDemoResult(rows, markdown_path, settings)


def tracked_parent(settings: LMDemoSettings, output_dir: str, tracking: dict[str, Any] | None):
    """The demo's MLflow run (``kind=demo``, task lm); a NullTracker when tracking is off."""
    tracking_cfg = TrackingConfig(**(tracking or {}))
    return tracked_run(uri=tracking_cfg.uri, experiment=tracking_cfg.experiment, kind="demo",
                       tags={"task": "lm", "dataset": settings.data_path or "fictitious_people",
                             "model": settings.model_name, "seed": settings.seed},
                       params=asdict(settings), run_name="demo-lm",
                       config_yaml=yaml.safe_dump(asdict(settings), sort_keys=False),
                       max_artifact_mb=tracking_cfg.max_artifact_mb, enabled=tracking_cfg.enabled)
