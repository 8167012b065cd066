"""Shared pieces of sub-commands: the registry and config options."""
from __future__ import annotations

import argparse
from typing import Any

from sharp_unlearn.config import ExperimentConfig, load_config
from sharp_unlearn.registry import Registry


class Command:
    help: str = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # pragma: no cover - overridden
        pass

    def run(self, args: argparse.Namespace) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


COMMANDS: Registry = Registry("command")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files win); packaged names work too")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlruns.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.name=sam optimizer.rho=0.1")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    return load_config(args.config, overrides, base=base)
