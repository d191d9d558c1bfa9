"""DualPrompt (methods/dualprompt.py) in training, on the tiny setting of tests/test_dualprompt.py:
gradients of G / e_t / k_t / head only and the mask, e_t copied from e_{t-1} when a task starts,
checkpoints, K/V order, prefix locality, the cost, and a tiny run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import method_helpers
from dynammo.batch import Batch
from dynammo.cost import count_flops
from dynammo.methods import dualprompt as dp_module
from dynammo.methods.dualprompt import DualPrompt, DualPromptModule
from dynammo.methods.prompt_base import mask_outside_task
from dynammo.models.prompting import query_features
from method_helpers import make_method, snapshot
from test_dualprompt import D, TOKENS, grown, images, scatter_entries

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- gradients, masking, optimiser


def test_only_g_e_t_k_t_and_head_get_gradients_and_the_mask_holds():
    m = grown(3)
    task = m.scenario.tasks[1]  # classes 4..6 of 10
    m.train_mode()
    m.current_task = task
    x = images()
    y = torch.tensor([4, 5, 6, 4, 5, 6])
    loss, logits, _ = m.step(Batch(x, y, x, torch.arange(6)))
    loss.backward()
    p = m.net.prompts
    assert p.g_prompt.grad is not None and p.g_prompt.grad.abs().sum() > 0
    assert p.e_prompts[1].grad.abs().sum() > 0 and p.e_keys[1].grad.abs().sum() > 0
    assert all(p.e_prompts[i].grad is None and p.e_keys[i].grad is None for i in (0, 2))
    for name, param in m.net.backbone.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    w = m.net.head.fc.weight.grad
    assert w[4:7].abs().sum() > 0 and torch.equal(w[:4], torch.zeros_like(w[:4])) and torch.equal(w[7:], torch.zeros_like(w[7:]))
    # the cross-entropy part equals CE over the task's own logits
    with torch.no_grad():
        q = query_features(m.net.vit, x)
        feats, extra = m.prompted_features(x, q, task)
        raw = m.net.head(feats)
        torch.testing.assert_close(loss.detach(), F.cross_entropy(raw[:, 4:7], y - 4) + extra)
        assert torch.equal(logits.detach(), mask_outside_task(raw, 4, 7))
    assert {id(t) for t in m.trainable()} == {id(p.g_prompt), id(p.e_prompts[1]), id(p.e_keys[1]),
                                              *(id(t) for t in m.net.head.parameters())}


def test_training_a_task_moves_only_g_e_t_k_t_and_head():
    m = grown(1, opt_type="adam", lrate=0.01, weight_decay=0.0)  # the official recipe: Adam, no weight decay
    task = m.scenario.tasks[1]
    m.begin_task(task)
    before = snapshot(m.net)
    m.train_task(task)
    m.end_task(task)
    after = snapshot(m.net)
    for name in ("prompts.e_prompts.0", "prompts.e_keys.0", "prompts.e_prompts.2", "prompts.e_keys.2"):
        assert torch.equal(before[name], after[name]), name
    for name in ("prompts.g_prompt", "prompts.e_prompts.1", "prompts.e_keys.1"):
        assert not torch.equal(before[name], after[name]), name
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    for key in ("head.fc.weight", "head.fc.bias"):  # task 0's rows: zero gradient, and Adam re-created per task
        assert torch.equal(before[key][:4], after[key][:4]) and not torch.equal(before[key][4:], after[key][4:])


# ---------------------------------------------------------------- task start


def test_e_t_is_a_copy_of_e_t_minus_1_when_the_task_starts_and_keys_are_not_copied():
    m = grown(1)
    p = m.net.prompts
    with torch.no_grad():
        p.e_prompts[0].normal_()
    k0, k1 = p.e_keys[0].detach().clone(), p.e_keys[1].detach().clone()
    m.begin_task(m.scenario.tasks[1])
    assert torch.equal(p.e_prompts[1], p.e_prompts[0])
    assert torch.equal(p.e_keys[1], k1) and not torch.equal(k1, k0)
    off = grown(1, shared_prompt_pool=False)
    e1 = off.net.prompts.e_prompts[1].detach().clone()
    off.begin_task(off.scenario.tasks[1])
    assert torch.equal(off.net.prompts.e_prompts[1], e1) and not torch.equal(e1, off.net.prompts.e_prompts[0])


def test_a_checkpoint_loads_exactly_although_grow_copies_the_entries():
    m = grown(2)
    with torch.no_grad():  # as after training task 1: e_1 no longer equals e_0
        m.net.prompts.e_prompts[1].add_(0.5)
    state = m.state_dict()
    fresh = make_method("dualprompt")
    fresh.load_state_dict(state)
    assert method_helpers.same(snapshot(fresh.net), snapshot(m.net))
    assert not torch.equal(fresh.net.prompts.e_prompts[1], fresh.net.prompts.e_prompts[0])


# ---------------------------------------------------------------- prefixes: order, locality


def test_swapping_key_and_value_prefixes_changes_the_output(monkeypatch):
    m = grown(3)
    scatter_entries(m)
    m.eval_mode()
    x = images()
    real_prefixes = DualPromptModule.prefixes
    with torch.no_grad():
        e = m.net.prompts.e_prompts[1].unsqueeze(0)
        prefixes = m.net.prompts.prefixes(e)
        for j, layer in enumerate([2, 3, 4]):  # key part is index 0, value part index 1 of the "2" axis
            assert torch.equal(prefixes[layer][0], e[:, j, 0]) and torch.equal(prefixes[layer][1], e[:, j, 1])
        out = m.predict(x)["logits"]
        monkeypatch.setattr(DualPromptModule, "prefixes",
                            lambda self, e: {k: (v, kk) for k, (kk, v) in real_prefixes(self, e).items()})
        assert not torch.allclose(m.predict(x)["logits"], out, atol=1e-4)


def block_outputs(m: DualPrompt, x: torch.Tensor):
    """Per pass of one predict call: {block index: output} of the blocks run by their own forward (a block
    given a prefix runs through the driver's prefix attention instead, so its hook does not fire)."""
    passes = [{}]
    vit = m.net.vit
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: passes[-1].__setitem__(i, out))
             for i, b in enumerate(vit.blocks)]
    hooks.append(vit.norm.register_forward_hook(lambda *a: passes.append({})))
    try:
        with torch.no_grad():
            out = m.predict(x)["logits"]
    finally:
        for h in hooks:
            h.remove()
    return passes[0], passes[1], out


def test_prefixes_reach_exactly_the_prompt_blocks(monkeypatch):
    seen = []
    real = dp_module.prefixed_features
    monkeypatch.setattr(dp_module, "prefixed_features", lambda vit, x, prefixes: seen.append(prefixes) or
                        real(vit, x, prefixes))
    m = grown(3, vit_depth=7)
    m.eval_mode()
    x = images()
    query, prompted, _ = block_outputs(m, x)
    assert set(query) == set(range(7)) and set(prompted) == {5, 6}  # blocks 0..4 get prefixes, 5 and 6 do not
    (prefixes,) = seen
    assert sorted(prefixes) == [0, 1, 2, 3, 4]
    assert all(k.shape == v.shape == (1, 5, D) for i, (k, v) in prefixes.items() if i < 2)  # G: shared
    assert all(k.shape == v.shape == (6, 5, D) for i, (k, v) in prefixes.items() if i >= 2)  # E: per sample


def test_hidden_states_before_the_first_prompt_block_are_the_frozen_ones():
    m = grown(3, g_prompt_layers=[2], e_prompt_layers=[3, 4])
    m.eval_mode()
    x = images()
    query, prompted, out = block_outputs(m, x)
    assert set(prompted) == {0, 1}
    for i in (0, 1):
        assert torch.equal(query[i], prompted[i])
    with torch.no_grad():
        frozen = m.net.head(m.net.vit.forward_features(x)[:, 0])
    assert not torch.allclose(out, frozen, atol=1e-4)


# ---------------------------------------------------------------- cost


def test_predict_costs_the_query_pass_plus_the_prefixed_pass():
    m = grown(3)
    m.eval_mode()
    x = images(1)
    plain = count_flops(m.net.vit.forward_features, x)
    prefix_extra = sum(2 * 2 * TOKENS * length * D for length in (5, 5, 5, 5, 5))  # q.k and attn.v per layer
    match_and_head = 2 * D * 3 + 2 * D * 10  # cos against 3 keys, head over 10 classes
    total = count_flops(m.predict, x)
    assert total == pytest.approx(2 * plain + prefix_extra + match_and_head, rel=0.01)
    m20 = grown(3, e_prompt_length=20)
    m20.eval_mode()
    assert count_flops(m20.predict, x) - total == pytest.approx(3 * 2 * 2 * TOKENS * 15 * D, rel=0.01)


# ---------------------------------------------------------------- end to end


def test_a_tiny_run_ends_with_an_accuracy_per_task(tiny_run):
    """conftest's tiny_run asserts main(["run", "--out", DIR, *tiny_run_args("dualprompt")]) == 0."""
    r = json.loads((tiny_run("dualprompt") / "results.json").read_text())
    assert r["status"] == "complete" and len(r["acc"]) == len(r["tasks"]) == 3
    assert len(r["task_id_acc"]) == 3 and r["task_id_acc"][0] == 100.0  # one key: task 1 is always found
    assert all(0.0 <= a <= 100.0 for a in r["acc"])
