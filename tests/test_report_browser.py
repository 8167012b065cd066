"""The comparison report in a real browser: headless Chromium at 1400 px, on a demo-shaped MLflow store.

Checks what a reader sees: the page does not scroll sideways, every figure loads, nothing errs in the
console. Chromium's own ``--headless --dump-dom`` runs an inline probe that writes its findings into
the DOM; ``--enable-logging=stderr`` shows the console. Skipped only when no Chromium binary exists
(``.ci/run`` installs Debian's ``chromium``).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from sharp_unlearn.cli import main  # noqa: E402
from sharp_unlearn.results import rows_from_metrics, write_results  # noqa: E402
from sharp_unlearn.tracking import tracked_run  # noqa: E402

WIDTH = 1400
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
#: the demo's shape: every method with SGD and SAM (sharp_minmax carries its own SAM), both pretrainings
METHODS = {"finetune": ("sgd", "sam"), "grad_ascent": ("sgd", "sam"), "neggrad": ("sgd", "sam"),
           "random_label": ("sgd", "sam"), "salun": ("sgd", "sam"), "scrub": ("sgd", "sam"),
           "sharp_minmax": ("sam",)}
SETTINGS = {"finetune": {"method.epochs": 3, "optimizer.lr": 0.05}, "neggrad": {"method.alpha": 0.99},
            "salun": {"method.mask_fraction": 0.5, "optimizer.lr": 0.005},
            "sharp_minmax": {"method.alpha": 0.99, "method.mask_fraction": 0.5}}
FORGET = "memorization-high-60"

# Writes the verdict into the page once everything (images included) has loaded; console errors and
# uncaught exceptions are counted from the first line of <head>, before the report's own script runs.
PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e.type)); }, true);
(function () { var original = console.error;
  console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " "));
                                original.apply(console, arguments); }; })();
window.addEventListener("load", function () {
  // unfolded tables must not widen the page either (they scroll inside their own box)
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  // sort the run table by ToW: a click on its header, then read the column back
  var sorted = null, table = document.querySelectorAll("table.sortable")[1];
  if (table) {
    var heads = Array.prototype.map.call(table.tHead.rows[0].cells, function (c) { return c.textContent; });
    var at = heads.indexOf("tow");
    if (at >= 0) {
      table.tHead.rows[0].cells[at].click();
      sorted = Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[at].textContent; });
    }
  }
  var images = Array.prototype.slice.call(document.images);
  var verdict = {scrollWidth: document.documentElement.scrollWidth, clientWidth: window.innerWidth,
                 images: images.length,
                 broken: images.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                               .map(function (i) { return i.alt; }),
                 widest: images.map(function (i) { return i.naturalWidth; }),
                 sortedTow: sorted, errors: window.__errors};
  var out = document.createElement("pre"); out.id = "probe-verdict";
  out.textContent = JSON.stringify(verdict); document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def make_demo_store(uri: str, tmp: Path, seeds=(0, 1)) -> dict[str, int]:
    """Runs shaped like the demo's: pretrain, retrain reference and every method x optimizer, per seed.

    Unlearning runs log a result table with the ``original`` and ``retrain`` rows (the baselines
    ``compare`` reads), the final metrics the demo logs (MIA and entanglement included) and the swept
    settings each method carries. Numbers vary by method, optimizer and seed so every CI is real.
    """
    counts = {"pretrain": 0, "retrain": 0, "unlearn": 0}
    common_tags = {"dataset": "digits", "model": "small_cnn"}
    for seed in seeds:
        for p_i, pre in enumerate(("sgd", "sam")):
            with tracked_run(uri=uri, experiment="sharp-unlearn", kind="pretrain", run_name=f"pretrain-{pre}",
                             tags={**common_tags, "optimizer": pre, "seed": seed},
                             params={"optimizer.name": pre, "seed": seed}) as pretrain:
                pretrain.log_metrics({"test_acc": 96.0 + p_i + seed / 5, "train_acc": 99.0, "wall_seconds": 40.0})
            reference = {"forget_acc": 12.0 + seed, "retain_acc": 99.5, "test_acc": 95.0 + p_i, "wall_seconds": 38.0}
            with tracked_run(uri=uri, experiment="sharp-unlearn", kind="retrain", run_name=f"retrain-{pre}-{FORGET}",
                             tags={**common_tags, "optimizer": pre, "seed": seed, "method": "retrain",
                                   "forget_set": FORGET, "pretrain_run_id": pretrain.run_id},
                             params={"optimizer.name": pre, "seed": seed}) as retrain:
                retrain.log_metrics(reference)
            original = {"tow": 0.55 + 0.05 * p_i, "forget_acc": 100.0, "retain_acc": 100.0, "test_acc": 96.0}
            counts["pretrain"] += 1
            counts["retrain"] += 1
            for m_i, (method, optimizers) in enumerate(METHODS.items()):
                for o_i, opt in enumerate(optimizers):
                    tow = min(0.99, 0.6 + 0.04 * m_i + 0.05 * o_i + 0.03 * p_i + 0.01 * seed)
                    metrics = {"tow": tow, "forget_acc": 100 * (1 - tow) + 10, "retain_acc": 97.0 + o_i + seed / 3,
                               "test_acc": 93.0 + m_i / 4 + seed / 7, "val_acc": 94.0, "forget_gap": 1 - tow,
                               "wall_seconds": 3.0 + m_i + o_i * 2 + seed / 2, "speedup_vs_retrain": 5.0,
                               "mia_efficacy": 0.3 + 0.05 * m_i + seed / 50, "mia_auc": 0.6 - 0.01 * m_i,
                               "entanglement_variance": 0.2 + 0.01 * m_i, "entanglement_wasserstein": 0.5 + seed / 9,
                               **{f"original_{k}": v for k, v in original.items()},
                               **{f"reference_{k}": v for k, v in reference.items()}}
                    rows = (rows_from_metrics(metrics, run_id="SELF", method=method, optimizer=opt, dataset="digits",
                                              forget_set=FORGET, seed=seed)
                            + rows_from_metrics(reference, run_id=retrain.run_id, method="retrain", optimizer=pre,
                                                dataset="digits", forget_set=FORGET, seed=seed)
                            + rows_from_metrics(original, run_id=pretrain.run_id, method="original", optimizer=pre,
                                                dataset="digits", forget_set=FORGET, seed=seed))
                    table = write_results(rows, tmp / f"results-{seed}-{pre}-{method}-{opt}.parquet")
                    params = {"optimizer.name": opt, "optimizer.rho": 0.05, "seed": seed,
                              **SETTINGS.get(method, {})}
                    with tracked_run(uri=uri, experiment="sharp-unlearn", kind="unlearn",
                                     run_name=f"{method}-{opt}-{FORGET}", params=params,
                                     tags={**common_tags, "method": method, "optimizer": opt, "seed": seed,
                                           "forget_set": FORGET, "pretrain_optimizer": pre,
                                           "pretrain_run_id": pretrain.run_id,
                                           "reference_run_id": retrain.run_id}) as run:
                        run.log_metrics({"tow": tow - 0.1, "forget_acc": 60.0}, step=1)
                        run.log_metrics(metrics)
                        run.log_artifact(table, "results")
                    counts["unlearn"] += 1
    return counts


def render_in_chromium(browser: str, page: Path, tmp: Path) -> tuple[dict, str]:
    """(the probe's verdict, Chromium's stderr) for ``page`` at WIDTH px."""
    text = page.read_text(encoding="utf-8")
    probed = tmp / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + PROBE_HEAD, 1), encoding="utf-8")
    profile = tmp / "chromium-profile"  # a fresh profile: no state from (or into) the user's
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={WIDTH},1000", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    # a hang guard, far above the ~5-20 s a cold start takes at load 6 on 2 cores
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    found = re.search(r'<pre id="probe-verdict">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no verdict in Chromium's DOM (rc={done.returncode}); stderr:\n{done.stderr[-3000:]}"
    import html

    return json.loads(html.unescape(found.group(1))), done.stderr


@pytest.mark.slow
def test_report_reads_well_in_headless_chromium_at_1400px(tmp_path, monkeypatch):
    browser = find_browser()
    if browser is None:
        pytest.skip(f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)}); .ci/run installs 'chromium'")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    counts = make_demo_store(uri, tmp_path)
    out = tmp_path / "compare"
    # the README's line
    assert main(["compare", "--quiet", "--filter", "tags.kind = 'unlearn'", "--out", str(out)]) == 0
    page = out / "report.html"
    text = page.read_text(encoding="utf-8")
    assert f"comparison of {counts['unlearn']} runs" in text  # title and header count the same runs
    baselines = counts["pretrain"] + counts["retrain"]  # an original row per pretraining, a retrain row per reference
    assert f"<b>runs</b>: {counts['unlearn']} runs + {baselines} baseline rows" in text
    verdict, stderr = render_in_chromium(browser, page, tmp_path)
    assert verdict["clientWidth"] == WIDTH, verdict
    assert verdict["scrollWidth"] <= WIDTH, f"the page scrolls sideways: {verdict}"
    assert verdict["images"] >= 5, verdict
    assert verdict["broken"] == [], f"images that did not load: {verdict['broken']}"
    assert verdict["errors"] == [], f"console errors: {verdict['errors']}"
    tows = [float(t) for t in verdict["sortedTow"] if t]  # rows without a ToW (the retrain baselines) go last
    assert len(tows) == counts["unlearn"] + counts["pretrain"] and tows == sorted(tows), verdict["sortedTow"]
    assert verdict["sortedTow"][len(tows):] == [""] * counts["retrain"]
    console = [line for line in stderr.splitlines() if "CONSOLE" in line and ("rror" in line or "Uncaught" in line)]
    assert console == [], console
