"""The demo's terminal output fits a 100-column terminal: no line is longer than the width."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# demo-shaped rows: the ToW table and the evaluation table, numbers of every size the demo prints
SCRIPT = textwrap.dedent("""
    from pathlib import Path
    from sharp_unlearn.commands.demo import print_demo
    from sharp_unlearn.recipes.demo import DemoResult

    rows, evaluation = [], []
    for pre in ("sgd", "sam"):
        for method, opt in [("original", "-"), ("retrain", "-"), ("finetune", "sgd"), ("finetune", "sam"),
                            ("random_label", "sgd"), ("sharp_minmax", "sam-min/sam-max"), ("rum", "sgd")]:
            rows.append({"seed": 0, "pretrain": pre, "level": "high", "method": method, "unlearn_opt": opt,
                         "retain_acc": 99.87654, "forget_acc": 5.0, "test_acc": 100.0, "tow": 0.912345678,
                         "wall_seconds": 1234.5678})
            evaluation.append({"seed": 0, "level": "high", "pretrain": pre, "method": method, "unlearn_opt": opt,
                               "mia_efficacy": 0.5123, "mia_auc": 0.61, "mia_tpr_at_1fpr": 0.0123,
                               "entanglement_variance": 167.98123, "entanglement_wasserstein": 0.00012345,
                               "sharpness_hessian": 153.2, "sharpness_sam": 1.40567})
    long_path = Path("runs/demo-output") / "demo_results.parquet"
    print_demo(DemoResult(rows=rows, results_path=long_path, markdown_path=long_path.with_suffix(".md"),
                          evaluation=evaluation))
""")


def _render(columns: int | None) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LINES", None)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_demo_tables_fit_100_columns():
    out = _render(100)
    lines = out.splitlines()
    assert "ToW against the retrained reference" in out and "sharp_minmax" in out
    too_long = [line for line in lines if len(line) > 100]
    assert not too_long, "\n".join(too_long)
    # nothing cropped to fit: every number of the last column is there, whole
    assert out.count("1.4057") == 14 and out.count("1234.6") == 14, out
    # the table takes the width it is given: at 200 columns the same output has lines over 100
    assert max(len(line) for line in _render(200).splitlines()) > 100


def test_output_to_a_file_gets_whole_lines():
    """Piped with no COLUMNS (a log file, CI): no terminal to fit, so labels are not folded at 80 columns."""
    out = _render(None)
    assert "sam-min/sam-max" in out and "random_label" in out  # whole labels, not folded over two lines
    assert max(len(line) for line in out.splitlines()) <= 160


def test_one_format_per_column():
    from sharp_unlearn.commands.console import column_format, format_value

    assert column_format("forget_acc", [5.0, 100.0]) == "{:.2f}"
    assert column_format("tow", [0.5, 1.0]) == "{:.4f}"
    assert column_format("other", [5.0, 100.0]) == "{:.2f}"  # one format, set by the largest value
    assert column_format("method", ["a", "b"]) is None
    assert format_value("test_acc", 97.123) == "97.12" and format_value("tow", 0.9) == "0.9000"


class _Terminal:
    """A stderr that says it is a terminal, recording what rich writes to it."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:
        raise OSError("not a real terminal")


def test_progress_shows_eta_inner_steps_and_stays(monkeypatch):
    from sharp_unlearn.progress import progress_bar, stage, sub_progress

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "120")
    stage(3, 38, "unlearn finetune/sam")
    with progress_bar("evaluate", 2) as advance:
        advance(completed=0, status="landscape")
        sub_progress(7, 9, "landscape")  # a step inside one metric moves the bar's status
    text = term.buffer.getvalue()
    assert "stage 3/38: unlearn finetune/sam" in text
    assert "landscape 7/9" in text and "eta" in text and "0/2" in text
    # not transient: the finished bar stays; a transient one ends by moving up and erasing its line
    assert not text.endswith("\x1b[2K") and "\x1b[1A\x1b[2K" not in text[-40:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert plain.rstrip().splitlines()[-1].lstrip().startswith("evaluate")
    sub_progress(1, 2)  # outside a bar: a no-op
    assert "1/2" not in term.buffer.getvalue().replace("0/2", "")


def test_progress_is_silent_when_quiet_or_piped(monkeypatch, capsys):
    from sharp_unlearn.progress import progress_bar, stage

    with progress_bar("train", 3) as advance:  # pytest's stderr is not a terminal
        advance()
    stage(1, 2, "pretrain", quiet=False)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with progress_bar("train", 3, quiet=True) as advance:
        advance()
    stage(1, 2, "pretrain", quiet=True)
    assert term.buffer.getvalue() == "" and capsys.readouterr().err == ""
