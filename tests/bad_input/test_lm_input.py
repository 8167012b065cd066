"""Bad question-answer data for `demo --task lm`: exit 2, one line naming the file and row, nothing written."""
from __future__ import annotations

import json

import pytest

from bad_input.harness import assert_exit_2_one_line, run_cli, snapshot


@pytest.mark.parametrize("bad_row, needle", [
    ({"question": "where was ana born ?", "subject": "ana"}, "missing 'answer'"),
    ({"question": "", "answer": "rome", "subject": "ana"}, "question=''"),
])
def test_bad_row_exits_2_naming_file_and_row(tmp_path, bad_row, needle):
    data = tmp_path / "people.jsonl"
    good = {"question": "what does bo do ?", "answer": "bo bakes", "subject": "bo"}
    data.write_text("\n".join(json.dumps(r) for r in (good, good, bad_row)) + "\n")
    before = snapshot(tmp_path)
    proc = run_cli(["demo", "--task", "lm", "--no-tracking", "--output-dir", str(tmp_path / "runs"),
                    f"data_path={data}"], cwd=tmp_path)
    assert_exit_2_one_line(proc, "demo", f"{data}: row 3", needle)
    assert snapshot(tmp_path) == before


def test_unknown_override_exits_2(tmp_path):
    proc = run_cli(["demo", "--task", "lm", "--no-tracking", "--output-dir", str(tmp_path / "runs"),
                    "pretrain_epoch=3"], cwd=tmp_path)
    assert_exit_2_one_line(proc, "demo", "pretrain_epoch=3")
