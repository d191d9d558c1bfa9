"""ACL and DynaMMo: stages, merging inside the method, min-others prediction and cost (options and
end-to-end runs: tests/test_acl_dynammo_options.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dynammo.cost import count_flops, count_params
from dynammo.methods import METHODS
from dynammo.methods.acl import heads_loss, others_labels
from dynammo.methods.frozen import train_backbone_then_freeze
from dynammo.models.adapters import AdapterSet, mean_of
from dynammo.models.heads import min_others

import method_helpers
from method_helpers import run_task, same, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(method_helpers.TINY, epochs_finetune=1, backbone_epochs=1)


def make_method(name: str, **kw):
    return method_helpers.make_method(name, TINY, **kw)


def randomize_(adapters: AdapterSet, seed: int) -> AdapterSet:
    """Visible adapters: random weights, BN statistics and a large alpha."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(adapters.named_parameters()) + list(adapters.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("alpha"):
                t.fill_(0.5 + seed * 0.1)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return adapters


def test_acl_and_dynammo_are_registered():
    assert "acl" in METHODS and "dynammo" in METHODS
    opts = METHODS.get("dynammo").options
    assert opts["merge_bn"].default == "average"
    assert opts["herding_space"].default == "task"
    assert opts["head_init"].default == "random"
    assert opts["lrate_finetune"].default == 1e-3 and opts["opt_type_finetune"].default == "adam"
    assert opts["weight_decay_finetune"].default == 0.0
    assert "merge_bn" not in METHODS.get("acl").options  # ACL has no merge


# ---------------------------------------------------------------- min-others


def test_min_others_on_hand_made_logits():
    # head 0: 2 classes + others; head 1: 3 classes + others. Columns: task 0 -> 0,1; task 1 -> 2,3,4
    inf = 30.0
    head0 = torch.tensor([[5.0, 0.0, 0.0],  # sample 0: head 0 sure, others low
                          [0.0, 0.0, 1.0],  # sample 1: head 0 says "others" a bit
                          [2.0, 1.9, -inf]])  # sample 2: head 0 others ~ 0
    head1 = torch.tensor([[0.0, 0.0, 0.0, 2.0],
                          [0.0, 3.0, 0.0, -1.0],  # head 1's others lowest -> task 1, class 2 + 1
                          [9.0, 0.0, 0.0, -2.0]])  # others ~2e-5, larger than head 0's ~7e-15
    out = min_others([head0, head1])
    assert out["task_id"].tolist() == [0, 1, 0]
    assert out["pred"].tolist() == [0, 3, 0]
    # sample 2: a naive argmax over all real-class probabilities would pick head 1's class 2 (p ~ 1)
    assert out["task_il_logits"][2].argmax().item() == 2
    assert out["logits"].argmax(1).tolist() == out["pred"].tolist()  # logits consistent with pred
    p0, p1 = torch.softmax(head0, 1), torch.softmax(head1, 1)
    torch.testing.assert_close(out["task_il_logits"], torch.cat([p0[:, :2], p1[:, :3]], 1))
    assert out["logits"].shape == (3, 5) and out["pred"].dtype == torch.long


def test_others_labels_and_heads_loss_count_only_present_tasks():
    y = torch.tensor([0, 1, 2, 3, 4])
    assert others_labels(y, 2, 4).tolist() == [2, 2, 0, 1, 2]
    torch.manual_seed(0)
    logits = [torch.randn(3, 3, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    bounds = [(0, 2), (2, 5)]
    only_task1 = torch.tensor([2, 4, 3])
    loss = heads_loss(logits, only_task1, bounds)
    torch.testing.assert_close(loss, F.cross_entropy(logits[1], only_task1 - 2))
    loss.backward()
    assert logits[0].grad is None  # head 0's term does not count: no sample of task 0
    mixed = torch.tensor([1, 4, 0])
    want = F.cross_entropy(logits[0], torch.tensor([1, 2, 0])) + F.cross_entropy(logits[1], torch.tensor([3, 2, 3]))
    torch.testing.assert_close(heads_loss(logits, mixed, bounds), want)


# ---------------------------------------------------------------- stages


def test_stage1_leaves_backbone_and_old_adapters_bit_for_bit_unchanged():
    m = make_method("acl")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    assert m.net.backbone_frozen and not any(p.requires_grad for p in m.net.backbone.parameters())
    backbone, path0, head0 = snapshot(m.net.backbone), snapshot(m.net.paths[0]), snapshot(m.net.heads[0])
    m.begin_task(t1)
    new = m.net.new_task_adapters()
    assert same(snapshot(new), path0)  # task 1 starts as a copy of task 0 (weights, BN stats, alpha)
    m.train_adapters(t1, new)  # stage 1
    assert same(snapshot(m.net.backbone), backbone)  # BN running stats included
    assert same(snapshot(m.net.paths[0]), path0)
    assert same(snapshot(m.net.heads[0]), head0)
    assert not same(snapshot(new), path0)  # the new adapters did train (weights and BN stats)


def test_stage3_trains_heads_only_with_everything_else_frozen():
    m = make_method("dynammo")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    seen = {}
    orig = m.train_heads

    def spy(task):
        seen["net"] = snapshot(m.net)
        orig(task)

    m.train_heads = spy
    run_task(m, t1)
    after = snapshot(m.net)
    changed = {k for k in after if not torch.equal(after[k], seen["net"][k])}
    assert changed and all(k.startswith("heads.") for k in changed)  # adapters' BN stats too: eval mode
    assert {k.split(".")[1] for k in changed} == {"0", "1"}  # every head trains in stage 3


def test_dynammo_merges_every_task_adapter_by_the_running_mean():
    m = make_method("dynammo")
    task_sets = []
    orig = m.after_adapters

    def record(task):
        task_sets.append(m.net.task_adapters().copy())
        orig(task)

    m.after_adapters = record
    for task in m.scenario:
        run_task(m, task)
    assert len(task_sets) == 3 and int(m.net.n_merged) == 3
    want = mean_of(task_sets).state_dict()
    for key, value in m.net.merged.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(task_sets[0].state_dict()[key])  # task 0's count, never averaged
        else:
            torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6)
    # the three task sets really differ, so the mean is not trivially any one of them
    assert not torch.equal(task_sets[1].state_dict()["adapters.layer1.conv.weight"],
                           task_sets[2].state_dict()["adapters.layer1.conv.weight"])
    # stored: the merged set and the last task set only
    sets = {id(s) for s in m.net.modules() if isinstance(s, AdapterSet)}
    assert len(sets) == 2 and not any(p.requires_grad for p in m.net.merged.parameters())


def test_backbone_protocol_without_pretrained_weights():
    m = make_method("acl", backbone_epochs=1)
    initial = snapshot(m.net.backbone)
    assert not m.net.backbone_frozen
    t0 = m.scenario.tasks[0]
    m.begin_task(t0)
    train_backbone_then_freeze(m, t0)
    trained = snapshot(m.net.backbone)
    assert not same(trained, initial)  # trained on task 0 ...
    assert m.net.backbone_frozen and not any(p.requires_grad for p in m.net.backbone.parameters())
    m.net.train()
    assert not m.net.backbone.training  # ... then frozen in eval mode for good
    m0 = make_method("acl", backbone_epochs=0)
    before = snapshot(m0.net.backbone)
    run_task(m0, t0)
    assert same(snapshot(m0.net.backbone), before)


def test_pretrained_path_is_frozen_from_the_start(tmp_path):
    from dynammo.models.backbones import build_backbone

    torch.manual_seed(123)
    weights = build_backbone("resnet20").state_dict()
    path = tmp_path / "resnet20.pt"
    torch.save(weights, path)
    m = make_method("dynammo", pretrained=str(path))
    assert m.net.backbone_frozen
    run_task(m, m.scenario.tasks[0])
    assert same(snapshot(m.net.backbone), weights)


# ---------------------------------------------------------------- inference


def grown(name: str, n_tasks: int, **kw):
    m = make_method(name, **kw)
    for task in m.scenario.tasks[:n_tasks]:
        m.grow(task)
    m.eval_mode()
    return m


def test_identical_task_adapters_give_dynammo_the_predictions_of_acl():
    acl = make_method("acl")
    dyn = make_method("dynammo")
    dyn.net.backbone.load_state_dict(acl.net.backbone.state_dict())
    for i, task in enumerate(acl.scenario.tasks):
        acl.grow(task)
        dyn.grow(task)
        if i == 0:  # the next tasks copy it: every task set identical, and so is their mean
            randomize_(acl.net.paths[0], 1)
            dyn.net.task_set.load_state_dict(acl.net.paths[0].state_dict())
    for h_acl, h_dyn in zip(acl.net.heads, dyn.net.heads):
        h_dyn.load_state_dict(h_acl.state_dict())
    acl.eval_mode(), dyn.eval_mode()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        a, d = acl.predict(x), dyn.predict(x)
        plain = dyn.net.backbone(x)
    assert not torch.allclose(dyn.net.head_features(x)[0], plain)  # the adapters do act
    assert torch.equal(a["pred"], d["pred"]) and torch.equal(a["task_id"], d["task_id"])
    torch.testing.assert_close(a["logits"], d["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["task_il_logits"], d["task_il_logits"], rtol=1e-5, atol=1e-6)


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_merged_model_runs_one_pass_read_by_every_head():
    m = grown("dynammo", 3)
    randomize_(m.net.merged, 2)
    stem_calls, body_calls = count_calls(m.net.backbone.conv1), count_calls(m.net.backbone.layer3)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        feats = m.net.head_features(x)
        want = m.net.backbone(x, stage_hook=m.net.merged.hook)
    assert len(feats) == 3 and all(torch.equal(f, feats[0]) for f in feats)
    torch.testing.assert_close(feats[0], want)
    with torch.no_grad():
        stem_calls.clear(), body_calls.clear()
        m.predict(x)
    assert (len(stem_calls), len(body_calls)) == (1, 1)


def test_acl_runs_the_stem_once_and_one_body_per_task():
    m = grown("acl", 3)
    for i, path in enumerate(m.net.paths):
        randomize_(path, i + 3)
    stem_calls, body_calls = count_calls(m.net.backbone.conv1), count_calls(m.net.backbone.layer3)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        feats = m.net.head_features(x)
    assert (len(stem_calls), len(body_calls)) == (1, 3)
    for f, path in zip(feats, m.net.paths):  # head i reads path i
        torch.testing.assert_close(f, m.net.backbone(x, stage_hook=path.hook))
    assert not torch.allclose(feats[0], feats[1])


def test_flops_constant_for_dynammo_and_growing_for_acl():
    x = torch.zeros(1, 3, 8, 8)
    flops = {}
    for name in ("acl", "dynammo"):
        flops[name] = [count_flops(grown(name, t).predict, x) for t in (1, 2, 3)]
    d = 64  # resnet20 feature size; task sizes 4, 3, 3 (+1 "others" output each)
    head = [2 * d * 5, 2 * d * 4, 2 * d * 4]
    dyn, acl = flops["dynammo"], flops["acl"]
    assert dyn[1] - dyn[0] == head[1] and dyn[2] - dyn[1] == head[2]  # only the tiny heads are added
    assert dyn[0] == acl[0]
    body = acl[1] - acl[0] - head[1]  # one more adapter path per task
    assert body > 0.8 * acl[0] and acl[2] - acl[1] == body + head[2]


def test_parameters_all_task_adapters_for_acl_merged_and_last_for_dynammo():
    acl, dyn = grown("acl", 3), grown("dynammo", 3)
    set_size = sum(p.numel() for p in acl.net.paths[0].parameters())
    heads = sum(p.numel() for p in acl.net.heads.parameters())
    backbone = sum(p.numel() for p in acl.net.backbone.parameters())
    assert count_params([acl.net]) == backbone + 3 * set_size + heads
    assert count_params([dyn.net]) == backbone + 2 * set_size + heads
    assert count_params([grown("dynammo", 1).net]) == count_params([grown("acl", 1).net])
