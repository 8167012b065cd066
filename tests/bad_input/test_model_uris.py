"""runs:/ and models:/ checkpoints that do not resolve, and bad --register names: exit 2, one line, nothing written."""
from __future__ import annotations

from pathlib import Path

from bad_input.harness import assert_exit_2_one_line, run_cli, snapshot

RUN_URI = "runs:/0123456789abcdef0123456789abcdef/model"


def _store(tmp_path: Path) -> str:
    from sharp_unlearn.tracking import client_for

    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    client_for(uri)
    return uri


def test_model_uri_against_a_missing_store_creates_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    before = snapshot(tmp_path)
    proc = run_cli(["evaluate", "--tracking-uri", uri, "--checkpoint", "models:/nope/1"], work)
    assert_exit_2_one_line(proc, "evaluate", "models:/nope/1", "does not exist")
    assert snapshot(tmp_path) == before


def test_unknown_registered_model_is_exit_2(tmp_path):
    uri = _store(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(work)
    proc = run_cli(["evaluate", "--tracking-uri", uri, "--checkpoint", "models:/nope/1"], work)
    assert_exit_2_one_line(proc, "evaluate", "models:/nope/1", "cannot be found")
    assert snapshot(work) == before


def test_unknown_run_model_is_exit_2_for_unlearn(tmp_path):
    uri = _store(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(work)
    proc = run_cli(["unlearn", "--tracking-uri", uri, "--checkpoint", RUN_URI, "method.name=neggrad",
                    "forget.kind=random", "forget.size=10"], work)
    assert_exit_2_one_line(proc, "unlearn", RUN_URI, "cannot be found")
    assert snapshot(work) == before


def test_register_name_with_a_slash_is_refused_first(tmp_path):
    before = snapshot(tmp_path)
    proc = run_cli(["unlearn", "--checkpoint", "missing.pt", "--register", "a/b", "method.name=neggrad"], tmp_path)
    assert_exit_2_one_line(proc, "unlearn", "--register 'a/b'")
    assert snapshot(tmp_path) == before
