"""RUM: rank-tertile groups by memorization, unlearned in rum_order, one method per group."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from method_helpers import make_method, tiny_bn_net, tiny_context, tiny_data

from sharp_unlearn.engine.runner import run_stage
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.methods.rum import rank_tertiles


def test_rank_tertiles():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    groups = rank_tertiles(scores)
    assert groups["low"].tolist() == [1, 3, 5]  # 0.1 0.3 0.2
    assert groups["mid"].tolist() == [2, 7, 8]  # 0.5 0.4 0.6
    assert groups["high"].tolist() == [0, 4, 6]  # 0.9 0.7 0.8
    # ties (the 0/1 "flipped" scores) still give three non-empty groups of near-equal size
    tied = rank_tertiles(np.array([1.0] * 10))
    assert [len(tied[k]) for k in ("low", "mid", "high")] == [4, 3, 3]
    assert sorted(np.concatenate(list(tied.values())).tolist()) == list(range(10))


def scored_context(model, n=12, **kw):
    forget = tiny_data(n, seed=2, offset=1000)
    scores = np.linspace(1.0, 0.0, n)  # the first examples are the most memorized
    return tiny_context(model, forget=forget, forget_scores=scores, **kw), scores


@pytest.mark.parametrize("order", [["low", "mid", "high"], ["high", "low", "mid"]])
def test_groups_unlearned_in_order(small_cfg, order):
    model = tiny_bn_net()
    ctx, scores = scored_context(model)
    method = make_method("rum", "sgd", rum_order=order, rum_methods=["neggrad", "scrub", "random_label"], epochs=2)
    streams = method.prepare(ctx)
    assert set(streams) == {"forget_low", "forget_mid", "forget_high"}
    # group membership by score rank: "high" holds the 4 most memorized forget examples
    index_of = {level: sorted(int(ds[i][2]) for i in range(len(ds))) for level, ds in
                ((k[len("forget_"):], v) for k, v in streams.items())}
    assert index_of["high"] == [1000, 1001, 1002, 1003]
    assert index_of["mid"] == [1004, 1005, 1006, 1007]
    assert index_of["low"] == [1008, 1009, 1010, 1011]
    assert method.epochs == 6
    # epoch -> group and method: rum_order[i] with rum_methods[i]
    expected_methods = dict(zip(order, ["neggrad", "scrub", "random_label"]))
    for epoch in range(6):
        stage, inner = method.stage_at(epoch)
        assert stage.level == order[epoch // 2] and inner == epoch % 2
        assert stage.method.cfg.name == expected_methods[stage.level]
    seen = []

    def phases(epoch):
        out = method.phases(epoch)
        seen.append((epoch, sorted({o.stream for p in out for o in p.objectives})))
        return out

    cfg = small_cfg("data.batch_size=8")
    datasets = {"retain": ctx.retain, "forget": ctx.forget, **streams}
    run_stage(model, phases, datasets, cfg=cfg, optimizer_cfg=cfg.optimizer, train_cfg=cfg.train,
              epochs=method.epochs, device=torch.device("cpu"), quiet=True)
    assert method.prepare_log == order
    by_epoch = {}
    for epoch, used in seen:
        by_epoch.setdefault(epoch, used)
    for epoch in range(6):
        forget_streams = [s for s in by_epoch[epoch] if s.startswith("forget")]
        assert forget_streams == [f"forget_{order[epoch // 2]}"]
    assert "forget" not in {s for _, used in seen for s in used}


def test_later_groups_are_prepared_on_the_model_earlier_groups_left(small_cfg):
    model = tiny_bn_net()
    ctx, _ = scored_context(model)
    method = make_method("rum", "sgd", rum_methods=["scrub"], epochs=1, max_epochs=1)
    streams = method.prepare(ctx)
    snapshots = {}

    def evaluate(model, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    cfg = small_cfg("data.batch_size=8", "train.eval_every=1")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, method.phases, {"retain": ctx.retain, "forget": ctx.forget, **streams}, cfg=cfg,
              optimizer_cfg=cfg.optimizer, train_cfg=cfg.train, epochs=method.epochs,
              device=torch.device("cpu"), evaluate=evaluate, quiet=True)
    teachers = [stage.method.teacher.state_dict() for stage in method.stages]
    assert all(torch.equal(teachers[0][k], start[k]) for k in start)            # low: the original model
    assert all(torch.equal(teachers[1][k], snapshots[1][k]) for k in start)     # mid: after the low group
    assert all(torch.equal(teachers[2][k], snapshots[2][k]) for k in start)     # high: after the mid group
    assert not all(torch.equal(teachers[2][k], start[k]) for k in start)


def test_one_method_for_all_groups_and_default():
    method = make_method("rum", rum_methods=["salun"])
    assert [s.method.cfg.name for s in method.stages] == ["salun"] * 3
    assert [s.method.cfg.name for s in make_method("rum").stages] == ["neggrad"] * 3


def test_optimizer_tag_of_groups():
    assert make_method("rum", "sam", rum_methods=["neggrad"]).optimizer_tag == "sam"
    assert make_method("rum", "sam", rum_methods=["neggrad", "sharp_minmax", "neggrad"]).optimizer_tag == \
        "sam+sam-min/sam-max"


@pytest.mark.parametrize("kwargs,match", [
    ({"rum_order": ["low", "high"]}, "exactly once"),
    ({"rum_order": ["low", "low", "high"]}, "exactly once"),
    ({"rum_methods": ["neggrad", "scrub"]}, "one per group"),
    ({"rum_methods": ["retrain"]}, "may not contain 'retrain'"),
    ({"rum_methods": ["rum"]}, "may not contain 'rum'"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_method("rum", **kwargs)


def test_needs_scores():
    model = tiny_bn_net()
    with pytest.raises(ConfigError, match="memorization scores"):
        make_method("rum").prepare(tiny_context(model))
    with pytest.raises(ConfigError, match="2 memorization scores for 12"):
        make_method("rum").prepare(tiny_context(model, forget_scores=np.zeros(2)))


def test_tiny_forget_set_skips_empty_groups():
    model = tiny_bn_net()
    ctx, _ = scored_context(model, n=2)
    method = make_method("rum", epochs=1)
    streams = method.prepare(ctx)
    assert sorted(streams) == ["forget_low", "forget_mid"] and method.epochs == 2
