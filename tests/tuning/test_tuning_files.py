"""The tuning package's own files and structure: atomic writes a resumed sweep can trust, the
project's one inter-process lock for the model cache, imports that go one way."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock, Timeout

from sharp_unlearn.tuning.runs import TrialRunsMixin
from sharp_unlearn.tuning.trial_state import TrialInputs, cache_lock

TUNING = Path(__file__).parents[2] / "sharp_unlearn" / "tuning"


def _status_callback(tmp_path: Path) -> TrialRunsMixin:
    return TrialRunsMixin(status_file=str(tmp_path / "trial_status.json"), sweep="s", stage="unlearn", dims=[],
                          pretrain_tree=None, unlearn_tree=None, unlearn_overrides={})


def test_a_crash_while_writing_trial_status_leaves_the_previous_file(tmp_path, monkeypatch):
    callback = _status_callback(tmp_path)
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"epoch": 3, "epochs_planned": 3}))
    before = (tmp_path / "trial_status.json").read_text()
    assert json.loads(before) == {"a": "TERMINATED"}

    def crash(src, dst):
        raise OSError("disk gone mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        callback.on_trial_error(0, [], SimpleNamespace(trial_id="b", run_metadata=SimpleNamespace(num_failures=1)))
    monkeypatch.undo()
    assert (tmp_path / "trial_status.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["trial_status.json"]  # no temp file left behind
    # what a resumed sweep's driver reads back: the last complete file
    assert _status_callback(tmp_path).status == {"a": "TERMINATED"}


def test_cache_lock_is_the_projects_file_lock(tmp_path):
    inputs = TrialInputs(stage="pretrain", dims=[], objective=None, pretrain_tree=None, unlearn_tree=None,
                         unlearn_overrides={}, output_dir=str(tmp_path))
    stage_dir = tmp_path / "pretrain" / "digits-abc"
    lock_file = tmp_path / "locks" / "pretrain-digits-abc.lock"
    with cache_lock(inputs, stage_dir):
        with pytest.raises(Timeout):  # another holder (a FileLock, as recipes and tracking take) must wait
            FileLock(str(lock_file), timeout=0).acquire()
    with FileLock(str(lock_file), timeout=0):  # released on exit
        pass


def _imports(module: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(module.read_text())
    return [(node.module or "", [alias.name for alias in node.names])
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]


def test_trial_modules_import_one_way_and_no_private_names():
    edges = {path.stem: _imports(path) for path in TUNING.glob("*.py")}
    imported = {name: {module for module, _ in found} for name, found in edges.items()}
    assert "sharp_unlearn.tuning.trainables" not in imported["sharded"]
    assert not {"sharp_unlearn.tuning.trainables", "sharp_unlearn.tuning.sharded"} & imported["trial_state"]
    private = [(name, module, alias) for name, found in edges.items() for module, aliases in found
               for alias in aliases if module.startswith("sharp_unlearn") and alias.startswith("_")]
    assert private == []
