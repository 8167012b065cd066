"""recipes/demo.py on synthetic grid rows: the Markdown result file, the parent run's ToW table
(mean over seeds) and its figure. (The whole demo runs in tests/test_tracking_models.py.)"""
import pytest

from sharp_unlearn.recipes.demo import TABLE_COLUMNS, log_grid_summary, results_markdown, tow_figure


def _row(method, opt, seed, tow, forget=50.0, pretrain="sgd", level="high"):
    return {"pretrain": pretrain, "level": level, "method": method, "unlearn_opt": opt, "seed": seed,
            "retain_acc": 99.5, "forget_acc": forget, "test_acc": 97.25, "tow": tow, "wall_seconds": 12.345}


ROWS = [_row("original", "-", 0, 0.5, forget=100.0), _row("retrain", "-", 0, 1.0),
        _row("neggrad", "sgd", 0, 0.8), _row("neggrad", "sgd", 1, 0.9), _row("salun", "sam", 0, None)]


class RecordingTracker:
    def __init__(self, run_id="parent"):
        self.run_id, self.tables, self.figures = run_id, {}, {}

    def log_preview_table(self, rows, path):
        self.tables[path] = rows

    def log_figure(self, figure, path):
        self.figures[path] = figure


def test_results_markdown_has_one_line_per_row_and_the_result_number_format():
    lines = results_markdown(ROWS).splitlines()
    assert lines[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert len(lines) == 2 + len(ROWS)
    neggrad = lines[4].split(" | ")
    # accuracies and seconds (>= 10) with 2 decimals, ToW with 4; a missing ToW is an empty cell
    assert neggrad[3:] == ["99.50", "50.00", "97.25", "0.8000", "12.35 |"]
    assert lines[-1].split(" | ")[6] == ""


def test_results_markdown_appends_the_evaluation_table_without_seed_and_level():
    evaluation = [{"pretrain": "sgd", "level": "high", "method": "neggrad", "seed": 0, "mia": 0.51234},
                  {"pretrain": "sgd", "level": "high", "method": "salun", "seed": 0, "entanglement": 3.5}]
    tables = results_markdown(ROWS, evaluation).split("\n\n")
    assert len(tables) == 2
    header, _, first, second = tables[1].splitlines()
    assert header == "| pretrain | method | mia | entanglement |"
    assert first == "| sgd | neggrad | 0.5123 |  |" and second == "| sgd | salun |  | 3.5000 |"


def test_grid_summary_is_the_mean_over_seeds_per_cell_with_evaluation_columns():
    tracker = RecordingTracker()
    evaluation = [{"pretrain": "sgd", "level": "high", "method": "neggrad", "unlearn_opt": "sgd", "seed": s,
                   "mia": m} for s, m in ((0, 0.4), (1, 0.6))]
    log_grid_summary(tracker, ROWS, evaluation, "demo")
    table = tracker.tables["tables/demo_tow.json"]
    cells = {(r["method"], r["unlearn_opt"]): r for r in table}
    assert len(table) == 4  # original, retrain, neggrad/sgd (two seeds), salun/sam
    neggrad = cells[("neggrad", "sgd")]
    assert neggrad["seeds"] == 2
    assert neggrad["tow"] == pytest.approx(0.85) and neggrad["mia"] == pytest.approx(0.5)
    assert cells[("salun", "sam")]["tow"] is None  # no number, not a zero
    assert "mia" not in cells[("original", "-")]
    assert list(tracker.figures) == ["demo_tow.png"]


def test_grid_summary_logs_nothing_without_a_run_or_rows():
    untracked = RecordingTracker(run_id=None)
    log_grid_summary(untracked, ROWS, [], "demo")
    empty = RecordingTracker()
    log_grid_summary(empty, [], [], "demo")
    assert untracked.tables == untracked.figures == empty.tables == empty.figures == {}


def test_tow_figure_one_bar_per_method_and_pretraining_baselines_left_out():
    table = [{**r, "tow": t} for r, t in ((_row("neggrad", "sgd", 0, 0), 0.8), (_row("neggrad", "sgd", 0, 0,
                                                                                     pretrain="sam"), 0.9),
                                           (_row("salun", "sam", 0, 0), 0.7), (_row("retrain", "-", 0, 0), 1.0))]
    figure = tow_figure(table)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["neggrad/sgd", "salun/sam"]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() == p.get_height())
    assert heights == [0.7, 0.8, 0.9]  # salun has no SAM-pretrained bar (NaN); retrain is not a bar
    assert tow_figure([_row("original", "-", 0, 0.5), _row("retrain", "-", 0, 1.0)]) is None


def test_the_demo_spec_on_a_tiny_grid_gives_a_row_per_method_and_optimizer(tmp_path):
    """run_demo end to end without MLflow: the packaged demo spec, cut to one pretraining optimizer,
    two methods, both unlearning optimizers and one epoch of a small model."""
    from sharp_unlearn.recipes.demo import run_demo

    methods, optimizers = ["finetune", "neggrad"], ["sgd", "sam"]
    tiny = ["base.train.epochs=1", "base.model.options={width: 4, feature_dim: 16}", "pretrain_optimizers=[sgd]",
            f"unlearn_optimizers=[{', '.join(optimizers)}]", "methods.finetune.epochs=1", "methods.neggrad.epochs=1"]
    result = run_demo(None, tiny, output_dir=str(tmp_path / "runs"), tracking={"enabled": False},
                      methods=methods, quiet=True, evaluate=False)

    unlearned = [r for r in result.rows if r["method"] not in ("original", "retrain")]
    assert sorted((r["method"], r["unlearn_opt"]) for r in unlearned) == sorted(
        (m, o) for m in methods for o in optimizers)
    assert {r["pretrain"] for r in result.rows} == {"sgd"}
    assert {r["method"] for r in result.rows} >= {"original", "retrain"}  # the baselines beside the methods
    for row in result.rows:
        assert 0.0 <= row["tow"] <= 1.0, row
    assert next(r for r in result.rows if r["method"] == "retrain")["tow"] == pytest.approx(1.0)
    # the Markdown file holds the same table: a header, a rule and one line per row
    assert len(result.markdown_path.read_text().strip().splitlines()) == 2 + len(result.rows)
    assert result.results_path.is_file()
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.glob("**/*.db"))  # tracking off: no store
