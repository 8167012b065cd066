"""`reproduce ablation`: its arms, the paired-difference verdicts, the CLI wiring and (slow) a tiny real run."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import yaml
from bad_input.harness import assert_exit_2_one_line, run_cli, snapshot

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.reproduce.ablation import (
    Slice,
    ablation_spec,
    ablation_tracking,
    build_variants,
    paired_effects,
    run_rows,
    run_slices,
    summarize,
    verdicts,
)
from sharp_unlearn.reproduce.paper_code import SWITCHES

PRESET = {"method": {"name": "sharp_minmax", "mask_order": "smallest", "forget_mask_scope": "perturbed",
                     "forget_perturbation": "full", "update_order": "sequential", "alpha": 0.99,
                     "rho_min": 0.1, "rho_max": 0.1, "adaptive_max": None},
          "optimizer": {"name": "sam", "base": "adamw", "lr": 0.01, "weight_decay": 5e-4}}
METHODS = {"sharp_minmax": {"epochs": 5, "alpha": 0.9, "mask_fraction": 0.5, "optimizers": ["sam"]},
           "salun": {"epochs": 2, "mask_fraction": 0.5, "optimizer": {"lr": 0.005}}}


def test_arms_change_one_thing_at_a_time_then_everything():
    arms = {v.entry: v for v in build_variants(METHODS, PRESET)}
    assert list(arms) == ["sharp_minmax@project", "sharp_minmax@mask_order=smallest",
                          "sharp_minmax@forget_mask_scope=perturbed", "sharp_minmax@forget_perturbation=full",
                          "sharp_minmax@update_order=sequential", "sharp_minmax@paper_defaults",
                          "sharp_minmax@paper_code", "salun@project", "salun@mask_order=smallest"]
    project = arms["sharp_minmax@project"].overrides
    assert project == METHODS["sharp_minmax"]
    for switch in SWITCHES:
        arm = arms[f"sharp_minmax@{switch}={PRESET['method'][switch]}"]
        assert arm.baseline == "sharp_minmax@project"
        assert arm.overrides == {**project, switch: PRESET["method"][switch]}  # that switch and nothing else
    defaults = arms["sharp_minmax@paper_defaults"].overrides
    assert not set(SWITCHES) & set(defaults)
    assert defaults["alpha"] == 0.99 and defaults["rho_max"] == 0.1 and defaults["epochs"] == 5
    assert defaults["optimizers"] == ["sam"]
    assert defaults["optimizer"] == {"base": "adamw", "lr": 0.01, "weight_decay": 5e-4}
    paper = arms["sharp_minmax@paper_code"].overrides
    assert {k: paper[k] for k in SWITCHES} == {k: PRESET["method"][k] for k in SWITCHES}
    assert paper["optimizer"] == defaults["optimizer"] and paper["alpha"] == 0.99
    assert arms["salun@project"].baseline is None and arms["sharp_minmax@project"].baseline is None
    assert arms["salun@mask_order=smallest"].overrides == {**METHODS["salun"], "mask_order": "smallest"}
    assert arms["salun@mask_order=smallest"].baseline == "salun@project"


def test_a_preset_missing_a_switch_or_setting_other_sections_is_refused():
    lacking = {"method": {k: v for k, v in PRESET["method"].items() if k != "update_order"}}
    with pytest.raises(ConfigError, match="method.update_order"):
        build_variants(METHODS, lacking, "p.yaml")
    with pytest.raises(ConfigError, match="sets data"):
        build_variants(METHODS, {**PRESET, "data": {"batch_size": 3}}, "p.yaml")
    # a train section is shared by every arm: it must already hold for the spec's unlearning runs
    constant = SimpleNamespace(schedule="constant", warmup_epochs=0)
    with_train = {**PRESET, "train": {"schedule": "constant", "warmup_epochs": 0}}
    assert len(build_variants(METHODS, with_train, "p.yaml", constant)) == 9
    with pytest.raises(ConfigError, match="train.schedule='constant'.*train.schedule='cosine'"):
        build_variants(METHODS, with_train, "p.yaml", SimpleNamespace(schedule="cosine", warmup_epochs=0))
    with pytest.raises(ConfigError, match="expected sharp_minmax"):
        build_variants(METHODS, {**PRESET, "method": {**PRESET["method"], "name": "salun"}}, "p.yaml")


def test_the_default_spec_is_the_demos_setting_at_three_levels_and_seeds():
    demo = yaml.safe_load(open("sharp_unlearn/configs/experiments/demo_digits.yaml"))
    spec = ablation_spec()
    assert spec["base"] == demo["base"]  # the demo's pretrained models: same training config, same cache
    assert spec["pretrain_optimizers"] == ["sgd", "sam"]
    assert spec["levels"] == ["low", "mid", "high"] and len(spec["seeds"]) >= 3
    assert spec["forget"]["scores"] == "heldout" and spec["memorization"]["num_models"] >= 2
    assert spec["methods"] == {k: demo["methods"][k] for k in ("sharp_minmax", "salun")}
    assert ablation_spec(["seeds=[4, 5]", "levels=[high]"])["seeds"] == [4, 5]


def _rows(arm_tow: dict[str, list[float]], level="high", pretrain="sgd", opt="sam-min/sam-max") -> list[dict]:
    rows = []
    for entry, values in arm_tow.items():
        for seed, value in enumerate(values):
            rows.append({"seed": seed, "pretrain": pretrain, "level": level, "method": entry.split("@")[0],
                         "entry": entry, "variant": entry.split("@")[1], "unlearn_opt": opt, "tow": value,
                         "test_acc": 90.0, "forget_gap": 10.0 * (1 - value), "mia_efficacy": 0.5})
    return rows


def test_verdicts_from_the_paired_difference_ci():
    arms = build_variants(METHODS, PRESET)
    # project ToW varies a lot between seeds; mask order adds ~0.1 on every seed (paired: significant although
    # the unpaired intervals overlap); update order moves it up and down (not significant)
    base = [0.60, 0.80, 0.70]
    rows = _rows({"sharp_minmax@project": base,
                  "sharp_minmax@mask_order=smallest": [b + d for b, d in zip(base, [0.09, 0.10, 0.11])],
                  "sharp_minmax@update_order=sequential": [b + d for b, d in zip(base, [0.05, -0.04, 0.01])]})
    rows += _rows({"sharp_minmax@project": base, "sharp_minmax@mask_order=smallest": base}, level="low")
    effects = paired_effects(rows, arms)
    tow = {(e["variant"], e["level"]): e for e in effects if e["metric"] == "tow"}
    mask = tow[("mask_order=smallest", "high")]
    assert mask["diff"] == pytest.approx(0.10) and mask["seeds"] == 3
    assert mask["ci95"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-3) and mask["significant"]
    assert not tow[("update_order=sequential", "high")]["significant"]
    assert not tow[("mask_order=smallest", "low")]["significant"]  # no difference at all
    # the forget gap moves with ToW here (10 * (1 - ToW)): its paired difference is -1 point per seed
    gap = next(e for e in effects if e["metric"] == "forget_gap" and e["variant"] == "mask_order=smallest"
               and e["level"] == "high")
    assert gap["diff"] == pytest.approx(-1.0) and gap["significant"]
    lines = {line.split(" (vs")[0]: line for line in verdicts(effects)}
    assert "changes ToW by +0.100 ± 0.025 on high (SGD-pretrained)" in lines["sharp_minmax mask_order=smallest"]
    assert "not significant on low (SGD-pretrained)" in lines["sharp_minmax mask_order=smallest"]
    assert "changes" not in lines["sharp_minmax update_order=sequential"]
    assert "not significant on high (SGD-pretrained)" in lines["sharp_minmax update_order=sequential"]
    assert "sharp_minmax forget_perturbation=full" not in lines  # an arm without runs says nothing


def test_an_arm_run_with_two_optimizers_pairs_each_with_its_own_baseline_run():
    arms = build_variants(METHODS, PRESET)
    rows = (_rows({"salun@project": [0.8, 0.8, 0.8], "salun@mask_order=smallest": [0.5, 0.5, 0.5]}, opt="sgd")
            + _rows({"salun@project": [0.6, 0.7, 0.8], "salun@mask_order=smallest": [0.6, 0.7, 0.8]}, opt="sam")
            # Sharp MinMax: one optimizer per arm, whose tag changes with the preset's optimizer
            + _rows({"sharp_minmax@project": [0.9, 0.9, 0.9]})
            + _rows({"sharp_minmax@paper_code": [0.2, 0.3, 0.1]}, opt="adamw-sam-min/adamw-sam-max"))
    tow = {(e["variant"], e["unlearn_opt"]): e for e in paired_effects(rows, arms) if e["metric"] == "tow"}
    assert tow[("mask_order=smallest", "sgd")]["diff"] == pytest.approx(-0.3)
    assert tow[("mask_order=smallest", "sam")]["diff"] == pytest.approx(0.0)
    assert tow[("paper_code", "adamw-sam-min/adamw-sam-max")]["diff"] == pytest.approx(-0.7)
    assert tow[("paper_code", "adamw-sam-min/adamw-sam-max")]["significant"]
    line = next(v for v in verdicts(list(paired_effects(rows, arms))) if v.startswith("salun"))
    assert "changes ToW by -0.300 ± 0.000 on high (SGD-pretrained, unlearning with SGD)" in line
    assert "not significant on high (SGD-pretrained, unlearning with SAM)" in line
    assert len(summarize(rows)) == 6  # SalUn's two optimizers stay apart


def test_one_seed_is_never_significant():
    effects = paired_effects(_rows({"sharp_minmax@project": [0.5], "sharp_minmax@paper_code": [0.9]}),
                             build_variants(METHODS, PRESET))
    assert not next(e for e in effects if e["metric"] == "tow")["significant"]


def test_run_rows_pair_each_run_with_its_own_evaluation():
    key = {"seed": 0, "pretrain": "sam", "level": "mid"}
    grid_rows = [{**key, "method": "original", "unlearn_opt": "-", "tow": 0.5},
                 {**key, "method": "sharp_minmax", "entry": "sharp_minmax@project", "unlearn_opt": "x", "tow": 0.7},
                 {**key, "method": "sharp_minmax", "entry": "sharp_minmax@paper_code", "unlearn_opt": "x", "tow": 0.8}]
    evaluation = [{**key, "method": "original", "unlearn_opt": "-", "mia_efficacy": 0.1},
                  {**key, "method": "sharp_minmax", "entry": "sharp_minmax@paper_code", "mia_efficacy": 0.3},
                  {**key, "method": "sharp_minmax", "entry": "sharp_minmax@project", "mia_efficacy": 0.2}]
    rows = {r["entry"]: r for r in run_rows(grid_rows, evaluation)}
    assert rows["original"]["mia_efficacy"] == 0.1 and rows["original"]["variant"] == "-"
    assert rows["sharp_minmax@project"]["mia_efficacy"] == 0.2
    assert rows["sharp_minmax@paper_code"]["mia_efficacy"] == 0.3
    assert rows["sharp_minmax@paper_code"]["variant"] == "paper_code"
    summary = summarize(list(rows.values()))
    assert [s["variant"] for s in summary] == ["-", "project", "paper_code"]  # baselines first


@pytest.mark.parametrize("args, needles", [
    (["ablation", "--trials", "3"], ["--trials", "not valid with reproduce ablation"]),
    (["ablation", "--sweep"], ["--sweep", "reproduce table"]),
    (["table", "--epochs", "2"], ["--sweep"]),
    (["ablation", "levels=[top]", "preset={preset}"], ["'top'", "high, mid, low"]),
    (["ablation", "methods.salun.mask_fraction=2", "preset={preset}"], ["mask_fraction=2"]),
    (["ablation", "preset=nowhere.yaml"], ["'nowhere.yaml'", "does not exist"]),
    (["ablation", "--workers", "0"], ["--workers=0", "integer >= 1"]),
    (["table", "--workers", "2"], ["--workers", "reproduce ablation"]),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(PRESET))
    args = [a.replace("{preset}", str(preset)) for a in args]
    before = snapshot(tmp_path)
    proc = run_cli(["reproduce", "--no-tracking", "--output-dir", str(tmp_path / "out"), *args], tmp_path)
    assert_exit_2_one_line(proc, "reproduce", *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_tiny_ablation_end_to_end(tmp_path):
    """Two seeds, one level, SGD pretraining only, tiny model: every arm runs, files and MLflow runs exist."""
    import pyarrow.parquet as pq

    from sharp_unlearn.reproduce.ablation import run_ablation
    from sharp_unlearn.tracking import client_for

    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump(PRESET))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    overrides = ["memorization.num_models=4", "memorization.executor=serial", "memorization.config.train.epochs=6",
                 "base.train.epochs=10", "base.train.checkpoint_every=0", "levels=[high]", "forget.size=30",
                 "pretrain_optimizers=[sgd]", "base.model.options={width: 8, feature_dim: 32}",
                 "methods.sharp_minmax.epochs=1", "methods.salun.epochs=1", f"preset={preset}"]
    result = run_ablation(output_dir=str(tmp_path / "out"), seeds=[0, 1], tracking={"uri": uri},
                          overrides=overrides)
    runs = pq.read_table(result["runs"]).to_pylist()
    arms = [v.entry for v in build_variants(METHODS, PRESET)]
    # SalUn runs with both unlearning optimizers of the demo's spec, Sharp MinMax with its SAM pair
    per_seed = [e for e in arms for _ in range(2 if e.startswith("salun") else 1)] + ["original", "retrain"]
    assert Counter((r["seed"], r["entry"]) for r in runs) == Counter((s, e) for s in (0, 1) for e in per_seed)
    assert all(0.0 <= r["tow"] <= 1.0 and r["mia_efficacy"] == r["mia_efficacy"] for r in runs
               if r["entry"] not in ("original", "retrain"))
    effects = pq.read_table(result["effects"]).to_pylist()
    assert {(e["variant"], e["metric"]) for e in effects} == {
        (v.name, m) for v in build_variants(METHODS, PRESET) if v.baseline
        for m in ("tow", "forget_gap", "mia_efficacy", "test_acc")}
    assert all(e["seeds"] == 2 for e in effects)
    report = open(result["report_md"]).read()
    assert len(result["verdicts"]) == 7 and all(line in report for line in result["verdicts"])
    client = client_for(uri)
    parent = client.search_runs([client.get_experiment_by_name("sharp-unlearn").experiment_id],
                                "tags.kind = 'reproduce'")
    assert len(parent) == 1 and parent[0].data.tags["reproduce"] == "ablation"
    children = [c for c in client.search_runs([parent[0].info.experiment_id], "tags.kind = 'unlearn'")
                if c.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert Counter(c.data.tags["ablation_variant"] for c in children) == Counter(
        e for e in per_seed * 2 if "@" in e)
    paper = [c for c in children if c.data.tags["ablation_variant"] == "sharp_minmax@paper_code"]
    assert all(c.data.params["method.update_order"] == "sequential" for c in paper)


def test_model_logging_is_off_for_the_ablation_unless_asked():
    spec = ablation_spec()
    assert ablation_tracking(spec, {"uri": "sqlite:///x.db"}) == {"uri": "sqlite:///x.db", "log_models": False}
    assert ablation_tracking(spec, {"log_models": True})["log_models"] is True
    asked = ablation_spec(["base.tracking.log_models=true"])
    assert ablation_tracking(asked, {})["log_models"] is True


@pytest.mark.slow
def test_parallel_slices_give_the_sequential_rows(tmp_path):
    """Two (seed, SGD) slices of two arms in two spawned workers: the same rows, in the same order and
    with the same numbers (MIA included), as the same slices run one after the other here."""
    spec = ablation_spec(["base.train.epochs=4", "base.train.checkpoint_every=0", "levels=[high]",
                          "forget.scores=flipped", "forget.size=30", "pretrain_optimizers=[sgd]",
                          "base.model.options={width: 8, feature_dim: 32}", "methods.sharp_minmax.epochs=1"])
    arms = build_variants(spec["methods"], PRESET)[:2]  # project Sharp MinMax and its mask order
    spec["methods"] = {v.entry: v.overrides for v in arms}
    tracking = ablation_tracking(spec, {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})

    def rows(workers):
        out = str(tmp_path / f"workers{workers}")
        slices = [Slice(spec, seed, "sgd", out, tracking, None, True) for seed in (0, 1)]
        # the run ids differ, and so do the timings (wall seconds, the speed-up over retraining)
        return [[{k: v for k, v in r.items() if k not in ("run_id", "wall_seconds", "speedup_vs_retrain")}
                 for r in part]
                for part in run_slices(slices, workers)]

    sequential, parallel = rows(1), rows(2)
    assert [[(r["seed"], r["entry"]) for r in part] for part in sequential] == [
        [(seed, e) for e in ("original", "retrain", *(v.entry for v in arms))] for seed in (0, 1)]
    assert all(r["mia_efficacy"] == r["mia_efficacy"] for part in sequential for r in part)
    assert parallel == sequential
