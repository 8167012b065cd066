"""Run comparison: selection, the table equals MLflow's numbers, summary over seeds, HTML report, the CLI."""
from __future__ import annotations

import base64
import csv
import math
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")
import pyarrow.parquet as pq  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sharp_unlearn.cli import main  # noqa: E402
from sharp_unlearn.errors import ConfigError  # noqa: E402
from sharp_unlearn.report import build_comparison, build_figures, mean_ci95, select_runs, summarize  # noqa: E402
from sharp_unlearn.tracking import tracked_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # schema migration once (~7 s)
    return path


@pytest.fixture
def uri(template_db, tmp_path, monkeypatch) -> str:
    db = tmp_path / "mlruns.db"
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return f"sqlite:///{db}"


def _log_run(uri, *, kind="unlearn", method="neggrad", optimizer="sgd", seed=0, rho=0.05, alpha=0.9,
             metrics=None, tags=None, experiment="exp"):
    all_tags = {"method": method if kind == "unlearn" else None, "optimizer": optimizer, "seed": seed,
                "dataset": "digits", "model": "small_cnn", "forget_set": "random-50", **(tags or {})}
    params = {"optimizer.name": optimizer, "optimizer.rho": rho, "method.alpha": alpha, "seed": seed}
    with tracked_run(uri=uri, experiment=experiment, kind=kind, tags=all_tags, params=params) as tracker:
        tracker.log_metrics({"train_loss": 2.0, "forget_acc": 99.0}, step=1)  # an "epoch"
        tracker.log_metrics(metrics or {})  # final values
    return tracker.run_id


@pytest.fixture(scope="module")
def sweep_store(template_db, tmp_path_factory):
    """Two methods x (sgd, sam at two rho) x two seeds, metrics with awkward floats; logged once per module.

    Tests may add runs of kind=compare or artifacts to it, never other runs.
    """
    db = tmp_path_factory.mktemp("sweep") / "mlruns.db"
    shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    ids = {}
    for m_i, method in enumerate(("neggrad", "salun")):
        for optimizer, rho in (("sgd", 0.05), ("sam", 0.05), ("sam", 0.1)):
            for seed in (0, 1):
                tow = 0.5 + 0.1 * m_i + (0.2 if optimizer == "sam" else 0.0) + rho + seed / 37
                ids[(method, optimizer, rho, seed)] = _log_run(
                    uri, method=method, optimizer=optimizer, seed=seed, rho=rho,
                    metrics={"tow": tow, "forget_acc": 100 * (1 - tow) / 3, "retain_acc": 99.0 - seed / 7,
                             "test_acc": 95.5 + seed / 3, "mia_efficacy": 0.2 + seed / 11, "wall_seconds": 3.25,
                             "lr": 0.0})
    return uri, ids


@pytest.fixture
def sweep(sweep_store, monkeypatch):
    uri, ids = sweep_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return ids


@pytest.fixture
def sweep_uri(sweep_store):
    return sweep_store[0]


def test_mean_ci95_matches_student_t():
    mean, ci = mean_ci95([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert ci == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci95([0.7]) == (0.7, None)


def test_table_columns_hold_logged_final_metrics_and_varying_params(sweep_uri, sweep):
    client = MlflowClient(sweep_uri)
    comparison = build_comparison(select_runs(client, experiments=["exp"]))
    assert len(comparison.rows) == len(sweep)
    assert comparison.metric_columns == ["tow", "forget_acc", "retain_acc", "test_acc", "train_loss",
                                         "mia_efficacy", "wall_seconds"]
    assert "lr" not in comparison.metric_columns  # per-step bookkeeping stays out
    assert "optimizer.rho" in comparison.param_columns and "method.alpha" not in comparison.param_columns
    for row in comparison.rows:
        logged = client.get_run(row["run_id"]).data.metrics
        for metric in comparison.metric_columns:
            assert row[metric] == logged[metric]
        assert row["forget_acc"] != 99.0  # the final value, not the epoch's
        assert isinstance(row["seed"], int)


def test_summary_groups_seeds_per_method_optimizer_and_rho(sweep_uri, sweep):
    comparison = build_comparison(select_runs(MlflowClient(sweep_uri), experiments=["exp"]))
    summary = summarize(comparison)
    assert len(summary) == 6  # 2 methods x (sgd, sam@0.05, sam@0.1)
    group = next(s for s in summary if s["method"] == "salun" and s["optimizer"] == "sam"
                 and s["optimizer.rho"] == 0.1)
    tows = [0.5 + 0.1 + 0.2 + 0.1 + seed / 37 for seed in (0, 1)]
    assert group["n"] == 2
    assert group["tow_mean"] == pytest.approx(sum(tows) / 2)
    assert group["tow_ci95"] == pytest.approx(mean_ci95(tows)[1])


def test_compare_cli_writes_tables_equal_to_logged_metrics(sweep_uri, sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a terminal wide enough for the whole table and its title
    out = tmp_path / "report"
    assert main(["compare", "--tracking-uri", sweep_uri, "-e", "exp", "--out", str(out), "--no-log"]) == 0
    client = MlflowClient(sweep_uri)
    logged = {run_id: client.get_run(run_id).data.metrics for run_id in sweep.values()}

    table = pq.read_table(out / "comparison.parquet").to_pylist()
    assert {r["run_id"] for r in table} == set(sweep.values())
    with open(out / "comparison.csv", newline="") as handle:
        csv_rows = {r["run_id"]: r for r in csv.DictReader(handle)}
    for row in table:
        for metric in ("tow", "forget_acc", "retain_acc", "test_acc", "mia_efficacy", "wall_seconds"):
            assert row[metric] == logged[row["run_id"]][metric]
            assert float(csv_rows[row["run_id"]][metric]) == logged[row["run_id"]][metric]

    long = pq.read_table(out / "results.parquet").to_pylist()
    assert {(r["run_id"], r["metric"]): r["value"] for r in long} == {
        (run_id, metric): value for run_id, metrics in logged.items() for metric, value in metrics.items()
        if metric not in ("lr",)}
    assert {r["split"] for r in long if r["metric"] == "forget_acc"} == {"forget"}

    markdown = (out / "comparison.md").read_text()
    some_run = sweep[("salun", "sam", 0.1, 1)]
    assert f"{logged[some_run]['tow']:.4f}" in markdown
    assert "±" in markdown
    assert "sharp-unlearn comparison of 12 runs" in capsys.readouterr().out


def test_html_report_is_self_contained_with_the_expected_plots(sweep_uri, sweep, tmp_path):
    out = tmp_path / "report"
    assert main(["compare", "--quiet", "--tracking-uri", sweep_uri, "-e", "exp", "--out", str(out), "--no-log"]) == 0
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert "href=" not in page and "<script src" not in page and "http" not in page  # nothing fetched
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"tow_by_method_optimizer", "accuracy_bars", "tow_vs_rho", "mia", "tow_vs_wall_seconds"} <= figures
    assert "tow_vs_alpha" not in figures  # alpha did not vary
    assert "entanglement" not in figures  # never logged
    for name in figures:
        assert f'alt="{name}"' in page


def test_figures_follow_the_data(uri):
    for seed in (0, 1):
        for alpha in (0.5, 0.9):
            _log_run(uri, alpha=alpha, seed=seed, metrics={"tow": alpha - seed / 10, "entanglement_variance": 0.3,
                                                             "entanglement_wasserstein": 0.6})
    _log_run(uri, kind="pretrain", optimizer="sam", metrics={"test_acc": 97.0})
    comparison = build_comparison(select_runs(MlflowClient(uri), experiments=["exp"]))
    figures = build_figures(comparison)
    assert {"tow_vs_alpha", "entanglement", "tow_by_method_optimizer"} <= set(figures)
    assert "tow_vs_rho" not in figures and "mia" not in figures


def test_compare_logs_the_report_to_a_compare_run_and_skips_old_reports(sweep_uri, sweep, tmp_path):
    client = MlflowClient(sweep_uri)
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id], "tags.kind = 'compare'")}
    for attempt in range(2):  # the second comparison must not include the first report run
        assert main(["compare", "--quiet", "--json", "--tracking-uri", sweep_uri, "-e", "exp",
                     "--out", str(tmp_path / f"r{attempt}")]) == 0
    reports = [r for r in client.search_runs([experiment_id], "tags.kind = 'compare'") if r.info.run_id not in before]
    assert len(reports) == 2
    assert all(r.data.tags["compared_runs"] == str(len(sweep)) for r in reports)
    artifacts = {a.path for a in client.list_artifacts(reports[0].info.run_id, "compare")}
    assert {"compare/report.html", "compare/comparison.parquet", "compare/comparison.md",
            "compare/comparison.csv", "compare/pivot_tow.csv", "compare/figures"} <= artifacts
    assert all(r.info.status == "FINISHED" for r in reports)


def test_compare_log_to_existing_run(sweep_uri, sweep, tmp_path):
    client = MlflowClient(sweep_uri)
    parent = sweep[("neggrad", "sgd", 0.05, 0)]
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    compare_runs = len(client.search_runs([experiment_id], "tags.kind = 'compare'"))
    assert main(["compare", "--quiet", "--tracking-uri", sweep_uri, "--run-ids", *list(sweep.values())[:3],
                 "--out", str(tmp_path / "r"), "--log-to", parent]) == 0
    assert "compare/report.html" in {a.path for a in client.list_artifacts(parent, "compare")}
    assert len(client.search_runs([experiment_id], "tags.kind = 'compare'")) == compare_runs  # no new run


def test_filter_and_run_ids_select_exactly(sweep_uri, sweep):
    client = MlflowClient(sweep_uri)
    salun = select_runs(client, filter_string="tags.method = 'salun' and params.`optimizer.rho` = '0.1'")
    assert {r.info.run_id for r in salun} == {sweep[("salun", "sam", 0.1, s)] for s in (0, 1)}
    chosen = [sweep[("neggrad", "sgd", 0.05, 1)], sweep[("salun", "sam", 0.05, 0)]]
    assert [r.info.run_id for r in select_runs(client, run_ids=chosen)] == chosen
    both = select_runs(client, run_ids=chosen, filter_string="tags.method = 'salun'")
    assert [r.info.run_id for r in both] == [chosen[1]]


def test_with_lineage_adds_pretrain_and_reference_runs(uri):
    pre = _log_run(uri, kind="pretrain", metrics={"test_acc": 97.0})
    ref = _log_run(uri, kind="retrain", tags={"pretrain_run_id": pre, "method": "retrain"},
                   metrics={"forget_acc": 90.0, "retain_acc": 100.0, "test_acc": 96.0})
    unl = _log_run(uri, tags={"pretrain_run_id": pre, "reference_run_id": ref}, metrics={"tow": 0.95})
    client = MlflowClient(uri)
    runs = select_runs(client, run_ids=[unl], with_lineage=True)
    assert {r.info.run_id for r in runs} == {pre, ref, unl}
    comparison = build_comparison(runs)
    assert comparison.lineage_columns == ["pretrain_run_id", "reference_run_id"]
    assert next(r for r in comparison.rows if r["run_id"] == unl)["reference_run_id"] == ref


@pytest.mark.parametrize("args, message", [
    (["-e", "no-such-experiment"], "does not exist"),
    (["--filter", "tags.kind === 'x'"], "not valid"),
    (["--run-ids", "0123456789abcdef0123456789abcdef"], "does not exist"),
    (["-e", "exp", "--filter", "tags.method = 'nothing-like-this'"], "no runs matched"),
    (["--max-runs", "0"], "at least 1"),
])
def test_bad_selection_exits_2_with_a_message(sweep_uri, sweep, tmp_path, capsys, args, message):
    assert main(["compare", "--tracking-uri", sweep_uri, "--out", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_select_runs_unknown_experiment_lists_known_ones(sweep_uri, sweep):
    with pytest.raises(ConfigError, match="known experiments: .*exp"):
        select_runs(MlflowClient(sweep_uri), experiments=["nope"])


def test_baselines_come_from_the_unlearn_runs_result_tables(uri, tmp_path):
    from sharp_unlearn.report import baseline_rows
    from sharp_unlearn.results import rows_from_metrics, write_results

    pre = _log_run(uri, kind="pretrain", metrics={"test_acc": 97.0})
    ref = _log_run(uri, kind="retrain", tags={"pretrain_run_id": pre, "method": "retrain"},
                   metrics={"test_acc": 96.0, "wall_seconds": 40.0})
    common = dict(dataset="digits", forget_set="random-50", seed=0)
    table = write_results(
        rows_from_metrics({"tow": 0.97, "forget_acc": 90.0}, run_id="UNL", method="neggrad", optimizer="sgd", **common)
        + rows_from_metrics({"forget_acc": 88.5, "retain_acc": 99.5, "test_acc": 96.0}, run_id=ref, method="retrain",
                            optimizer="sam", **common)
        + rows_from_metrics({"tow": 0.9125, "forget_acc": 100.0, "retain_acc": 99.9}, run_id=pre, method="original",
                            optimizer="sam", **common), tmp_path / "results.parquet")
    with tracked_run(uri=uri, experiment="exp", kind="unlearn",
                     tags={"method": "neggrad", "optimizer": "sgd", "seed": 0, "forget_set": "random-50",
                           "pretrain_run_id": pre, "reference_run_id": ref, "pretrain_optimizer": "sam"}) as unl:
        unl.log_metrics({"tow": 0.97, "forget_acc": 90.0})
        unl.log_artifact(table, "results")
    client = MlflowClient(uri)
    runs = select_runs(client, run_ids=[unl.run_id], with_lineage=True)
    comparison = build_comparison(runs, baselines=baseline_rows(client, runs))
    rows = {(r["kind"], r["run_id"]): r for r in comparison.rows}
    assert set(rows) == {("pretrain", pre), ("retrain", ref), ("unlearn", unl.run_id), ("original", pre)}
    original = rows[("original", pre)]
    assert original["status"] == "baseline" and original["tow"] == 0.9125 and original["retain_acc"] == 99.9
    assert original["optimizer"] == "sam"
    retrain = rows[("retrain", ref)]  # the selected reference run gains its forget/retain accuracy
    assert retrain["status"] == "FINISHED" and retrain["retain_acc"] == 99.5 and retrain["wall_seconds"] == 40.0
    assert retrain["forget_acc"] == 99.0  # a value the run logged itself wins over the result table's
    assert "pretrain_optimizer" in comparison.id_columns
    without = build_comparison(runs)
    assert ("original", pre) not in {(r["kind"], r["run_id"]) for r in without.rows}


def test_readme_compare_line_works_when_baseline_runs_are_not_selected(uri, tmp_path):
    """The README's `compare --filter "tags.kind = 'unlearn'"`: the baselines' own runs are not selected."""
    from sharp_unlearn.results import rows_from_metrics, write_results

    pre = _log_run(uri, kind="pretrain", metrics={"test_acc": 97.0})
    ref = _log_run(uri, kind="retrain", tags={"pretrain_run_id": pre, "method": "retrain"}, metrics={"test_acc": 96.0})
    common = dict(dataset="digits", forget_set="random-50", seed=0)
    for alpha, tow in ((0.9, 0.97), (0.8, 0.93)):  # a varying sweep param: the column is built over every row
        table = write_results(
            rows_from_metrics({"tow": tow}, run_id="UNL", method="neggrad", optimizer="sgd", **common)
            + rows_from_metrics({"forget_acc": 88.5, "retain_acc": 99.5, "test_acc": 96.0}, run_id=ref,
                                method="retrain", optimizer="sgd", **common)
            + rows_from_metrics({"tow": 0.91, "forget_acc": 100.0}, run_id=pre, method="original", optimizer="sgd",
                                **common), tmp_path / f"results-{alpha}.parquet")
        with tracked_run(uri=uri, experiment="exp", kind="unlearn", params={"method.alpha": alpha},
                         tags={"method": "neggrad", "optimizer": "sgd", "seed": 0, "forget_set": "random-50",
                               "pretrain_run_id": pre, "reference_run_id": ref}) as unl:
            unl.log_metrics({"tow": tow})
            unl.log_artifact(table, "results")
    out = tmp_path / "compare"
    assert main(["compare", "--tracking-uri", uri, "--filter", "tags.kind = 'unlearn'", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(next(out.glob("*.csv")))))
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == ["original", "retrain", "unlearn", "unlearn"], kinds


# --------------------------------------------------------------------------- pivots and figures (no MLflow)
def _demo_comparison(seeds_of=lambda method, opt, pre: (0, 1)):
    """A Comparison shaped like the demo's: 3 methods x sgd/sam x pretrain sgd/sam, plus baseline rows."""
    from sharp_unlearn.report import Comparison

    rows = []
    for p_i, pre in enumerate(("sgd", "sam")):
        for seed in (0, 1):
            rows.append({"run_id": f"pre-{pre}", "kind": "original", "method": "original", "status": "baseline",
                         "optimizer": pre, "pretrain_optimizer": pre, "forget_set": "memorization-high-60",
                         "seed": seed, "tow": 0.5 + p_i / 10, "test_acc": 96.0})
            rows.append({"run_id": f"ref-{pre}", "kind": "retrain", "method": "retrain", "status": "baseline",
                         "optimizer": pre, "pretrain_optimizer": pre, "forget_set": "memorization-high-60",
                         "seed": seed, "test_acc": 95.0, "mia_efficacy": 0.5})
        for m_i, method in enumerate(("finetune", "neggrad", "salun")):
            for o_i, opt in enumerate(("sgd", "sam")):
                for seed in seeds_of(method, opt, pre):
                    rows.append({"run_id": f"{method}-{opt}-{pre}-{seed}", "kind": "unlearn", "method": method,
                                 "status": "FINISHED", "optimizer": opt, "pretrain_optimizer": pre,
                                 "forget_set": "memorization-high-60", "seed": seed,
                                 "tow": 0.6 + m_i / 10 + o_i / 20 + p_i / 50 + seed / 100,
                                 "test_acc": 93.0 + m_i, "mia_efficacy": 0.2 + m_i / 10 + seed / 100,
                                 "wall_seconds": 2.0 + m_i + seed})
    return Comparison(rows, ["run_id", "status", "kind", "method", "optimizer", "pretrain_optimizer", "forget_set",
                             "seed"], [], ["tow", "test_acc", "mia_efficacy", "wall_seconds"], [], {})


def test_tow_pivot_is_method_by_optimizer_with_ci_only_for_several_seeds_and_the_best_marked():
    from sharp_unlearn.report import pivot

    comparison = _demo_comparison(seeds_of=lambda m, o, p: (0,) if (m, o, p) == ("finetune", "sgd", "sam") else (0, 1))
    table = pivot(comparison, "tow")
    assert table.row_columns == ["method", "unlearning optimizer"]
    assert table.rows[0] == ("original", "") and ("retrain", "") not in table.rows  # retrain has no ToW
    assert table.rows[1:] == [(m, o) for m in ("finetune", "neggrad", "salun") for o in ("sam", "sgd")]
    assert table.column_names == ["pretrained with sam", "pretrained with sgd"]
    sam, sgd = table.columns
    assert table.cell_text(("finetune", "sgd"), sam) == f"{0.6 + 0.02:.4f} (n=1)"  # one seed: no CI
    two = [0.6 + 0.1 + 0.05 + seed / 100 for seed in (0, 1)]
    mean, ci = mean_ci95(two)
    assert table.cell_text(("neggrad", "sam"), sgd) == f"{mean:.4f} ± {ci:.4f} (n=2)"
    assert table.best == {(("salun", "sam"), sam), (("salun", "sam"), sgd)}  # the highest ToW per column
    mia = pivot(comparison, "mia_efficacy", best="retrain")  # closest to the retrained reference (0.5)
    assert mia.best == {(("salun", "sam"), sam), (("salun", "sgd"), sam), (("salun", "sam"), sgd),
                        (("salun", "sgd"), sgd)}


def test_report_html_opens_with_the_pivots_counts_agree_and_long_tables_fold_and_sort():
    from sharp_unlearn.report import render_html, summarize

    comparison = _demo_comparison()
    page = render_html(comparison, summarize(comparison), {}, "sharp-unlearn comparison of 24 runs")
    assert page.index("ToW: tug of war") < page.index("MIA efficacy") < page.index("Test accuracy") \
        < page.index("<details>")
    assert "<b>runs</b>: 24 runs + 8 baseline rows" in page
    # per pretraining column: ToW one, MIA and test accuracy two each (salun's sgd and sam tie)
    assert page.count('class="best"') == 2 * (1 + 2 + 2)
    assert page.count('<table class="sortable">') == 2 and page.count("<details>") == 2
    assert '<div class="scroll tall"><table class="sortable">' in page  # wide tables scroll in their own box
    assert "<script>" in page and "<script src" not in page


def _legend_outside(fig) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lay out, as when the PNG is written
    renderer = canvas.get_renderer()
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    return bool(fig.legends) and all(ax.get_legend() is None for ax in fig.axes) and all(
        not legend.get_window_extent(renderer).overlaps(box) for legend in fig.legends for box in boxes)


def test_figures_fit_a_screen_with_legends_outside_one_colour_per_method_and_no_caps_for_one_seed():
    from matplotlib.collections import LineCollection

    from sharp_unlearn.report import FIGURE_WIDTH, build_figures

    one_seed = build_figures(_demo_comparison(seeds_of=lambda m, o, p: (0,)))
    assert {"tow_by_method_optimizer", "tow_vs_wall_seconds", "mia"} <= set(one_seed)
    for name, fig in one_seed.items():
        assert fig.get_figwidth() <= FIGURE_WIDTH <= 12, name  # 1200 px at 100 dpi, inside a 1400 px window
    tow = one_seed["tow_by_method_optimizer"]
    assert not [c for ax in tow.axes for c in ax.collections if isinstance(c, LineCollection)]  # no error bars
    assert _legend_outside(tow) and _legend_outside(one_seed["tow_vs_wall_seconds"])
    colours = defaultdict_colours(one_seed["tow_vs_wall_seconds"])
    assert len(colours) == 3  # finetune, neggrad, salun: one colour each, whatever the optimizer
    two_seeds = build_figures(_demo_comparison())["tow_by_method_optimizer"]
    assert [c for ax in two_seeds.axes for c in ax.collections if isinstance(c, LineCollection)]  # CIs drawn


def defaultdict_colours(fig) -> set:
    from matplotlib.colors import to_hex

    return {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "None"}
