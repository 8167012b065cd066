"""Shared pieces of sub-commands: the registry and config options."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sharp_unlearn.config import ExperimentConfig
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.registry import Registry

# lazy: the sharp_unlearn imports inside the functions below keep `sharp-unlearn --help` fast: cli.py
# imports every command, and the recipes a command runs import torch, and mlflow or ray


class Command:
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # pragma: no cover - overridden
        pass

    def run(self, args: argparse.Namespace) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


COMMANDS: Registry = Registry("command")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files win); the packaged names demo_digits and "
                             "reproduce_digits are grid specs for `demo --spec` and `reproduce table`")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    add_deterministic_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.name=sam optimizer.rho=0.1")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """``--address`` of the commands whose sharded runs (``distributed.backend=deepspeed``) go through Ray."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster for distributed.backend=deepspeed (same as distributed.address=...; "
                             "default: $RAY_ADDRESS, else a local Ray for this run)")


def add_deterministic_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical reruns: deterministic kernels and a fixed CPU thread count "
                             "(1 unless threads=N is given); same seed, device and versions needed")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    if getattr(args, "deterministic", False):
        overrides.append("deterministic=true")
    if getattr(args, "address", None):
        overrides.append(f"distributed.address={args.address}")
    # imported here: the registries it checks names against load torch, and the CLI starts without it
    from sharp_unlearn.validation import load_config

    cfg = load_config(args.config, overrides, base=base)
    check_output_dir(cfg.output_dir)
    return cfg


def check_output_dir(output_dir: str) -> None:
    """Refuse an ``output_dir`` that is (or lies below) a file now, not after hours of training."""
    path = Path(output_dir).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if candidate.is_dir():
                return
            where = "is a file" if candidate == path else f"lies below the file {str(candidate)!r}"
            raise ConfigError(f"output_dir={output_dir!r} {where}; expected a directory (or a path to create)")
