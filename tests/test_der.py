"""DER (dynamically expandable representation): one backbone more per task in parameters and FLOPs,
frozen old extractors, the auxiliary "old" class, classifier retraining, reloading, and an
end-to-end run of the `dynammo` command."""
from __future__ import annotations

import json

import pytest
import torch

from dynammo.cost import count_flops, count_params, gflops_per_image
from dynammo.methods import METHODS
from dynammo.methods.der import old_vs_new_labels
from dynammo.models.backbones import build_backbone

import method_helpers
from method_helpers import run_task, snapshot, same

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(method_helpers.TINY, epochs_finetune=1)


def make_method(**kw):
    return method_helpers.make_method("der", TINY, **kw)


def test_names_never_confuse_der_with_der_pp():
    for alias in ("der", "dynamic_er", "der_il"):
        assert METHODS.canonical(alias) == "der"
    summary = METHODS.get("der").summary
    assert "Dynamically Expandable Representation" in summary and "not DER++" in summary


def test_parameters_and_flops_grow_by_exactly_one_backbone_per_task():
    m = make_method()
    backbone = build_backbone("resnet20")
    x = m.engine.test_tf(m.scenario.test.get(torch.tensor([0])))
    bb_params, bb_flops, d = count_params([backbone]), count_flops(backbone.eval(), x), backbone.out_dim
    m.eval_mode()
    for n_tasks, task in enumerate(m.scenario.tasks, start=1):
        m.grow(task)
        m.eval_mode()
        fc = d * n_tasks * task.end + task.end  # the classifier over every extractor's features
        assert len(m.net.extractors) == n_tasks
        assert count_params([m.net]) == n_tasks * bb_params + fc
        assert gflops_per_image(m.predict, x) * 1e9 == pytest.approx(n_tasks * bb_flops + 2 * d * n_tasks * task.end,
                                                                     abs=0.5)


def test_new_extractor_starts_as_a_copy_and_old_ones_stay_bit_for_bit_unchanged():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    first = snapshot(m.net.extractors[0])  # weights and BatchNorm statistics
    old_fc = m.net.fc.weight.detach().clone()
    m.begin_task(t1)
    assert same(snapshot(m.net.extractors[1]), first)  # initialised as a copy of the previous one
    assert not any(p.requires_grad for p in m.net.extractors[0].parameters())
    assert torch.equal(m.net.fc.weight[:4, :64], old_fc)  # old classes x old features kept
    m.train_mode()
    assert not m.net.extractors[0].training and m.net.extractors[1].training

    m.train_representation(t1)
    after_stage1 = snapshot(m.net.extractors[1])
    assert same(snapshot(m.net.extractors[0]), first)
    assert not same(after_stage1, first)  # the new extractor learned
    fc_before = snapshot(m.net.fc)
    m.train_classifier(t1)
    assert same(snapshot(m.net.extractors[0]), first)
    assert same(snapshot(m.net.extractors[1]), after_stage1)  # stage 2 trains the classifier only
    assert not same(snapshot(m.net.fc), fc_before)


def test_auxiliary_labels_put_every_old_class_in_one():
    y = torch.tensor([0, 3, 4, 5, 6, 2])
    assert old_vs_new_labels(y, 4).tolist() == [0, 0, 1, 2, 3, 0]


def test_auxiliary_classifier_is_trained_but_not_kept():
    m = make_method()
    run_task(m, m.scenario.tasks[0])
    before = count_params([m.net])
    m.engine.trained_params = {}  # as the runner does at every task
    run_task(m, m.scenario.tasks[1])
    d = m.net.feature_dim
    # trained this task: the new extractor, the classifier (2d -> 7) and the auxiliary one (d -> 3 + 1)
    new_extractor = count_params([m.net.extractors[1]])
    assert sum(m.engine.trained_params.values()) == new_extractor + (2 * d * 7 + 7) + (d * 4 + 4)
    # kept: the new extractor, and the classifier grown from d -> 4 to 2d -> 7; no auxiliary classifier
    assert count_params([m.net]) == before + new_extractor + (2 * d * 7 + 7) - (d * 4 + 4)


def test_reload_gives_identical_predictions():
    m = make_method()
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    fresh = make_method(seed=5)
    fresh.load_state_dict(m.state_dict())
    assert len(fresh.net.extractors) == 2
    m.eval_mode()
    fresh.eval_mode()
    x = m.engine.test_tf(m.scenario.test.get(torch.arange(20)))
    assert torch.equal(m.predict(x)["logits"], fresh.predict(x)["logits"])


def test_end_to_end_cli(tiny_run):
    """The shared tiny run (conftest `tiny_run`; tests/test_method_contract.py checks its reload,
    export, cost, resume and reproducibility)."""
    out = tiny_run("der")
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["method"] == "der"
    assert len(r["acc"]) == 3 and r["avg_acc"] is not None and r["forgetting"] is not None
    backbone = build_backbone("resnet20")
    bb, d = count_params([backbone]), backbone.out_dim
    ends = [4, 7, 10]
    assert [c["params_total"] for c in r["cost"]] == [(t + 1) * bb + (t + 1) * d * e + e for t, e in enumerate(ends)]
    g = [c["inference_gflops"] for c in r["cost"]]
    assert g[1] - g[0] == pytest.approx(g[2] - g[1], rel=0.01) and g[2] == pytest.approx(3 * g[0], rel=0.01)
    assert all(c["memory_exemplars"] > 0 for c in r["cost"])
    assert "classifier" in (out / "log.txt").read_text()  # the balanced retraining stage ran
