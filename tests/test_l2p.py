"""L2P (methods/l2p.py) on the tiny vit_cpu: its options, matching, selection, the pull term,
gradients and masking (the prompted pass, its cost and tiny runs: tests/test_l2p_prompted_pass.py;
spec ../shared/research/prompt_methods.md, sections 1, 7 and 9)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.configure import build_config
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.l2p import PromptPool, batchwise_ids, pull_term
from dynammo.models.prompting import query_features

from method_helpers import VIT_TINY, make_method, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
SIDE = VIT_TINY["img_size"]


def built(tasks: int = 1, **kw):
    """L2P with the structure of its first `tasks` tasks (no training), backbone frozen, eval mode."""
    m = make_method("l2p", **kw)
    for task in m.scenario.tasks[:tasks]:
        m.grow(task)
    m.eval_mode()
    return m


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def features(m, x, task=None):
    q = query_features(m.net.vit, x)
    return m.prompted_features(x, q, task)


def n_tokens(m) -> int:
    return m.net.vit.patch_embed.num_patches + 1


def capture(module, outputs: list, pre: bool = False):
    if pre:
        return module.register_forward_pre_hook(lambda mod, args: outputs.append(args[0].detach().clone()))
    return module.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))


# ---------------------------------------------------------------- options and configuration


def test_registered_with_the_papers_defaults_and_alias():
    assert METHODS.get("learning_to_prompt") is METHODS.get("l2p")
    m = built()
    cfg = m.cfg
    assert (cfg.pool_size, cfg.prompt_length, cfg.top_k, cfg.pull_weight) == (10, 5, 5, 0.5)
    assert (cfg.prompt_position, cfg.head_input, cfg.batchwise_prompt, cfg.l2p_variant, cfg.prompt_grad_clip) == \
        ("after_cls", "prompt", False, "prompt_tuning", 1.0)
    pool = m.net.prompts
    assert pool.prompts.shape == (10, 5, 32) and pool.keys.shape == (10, 32)
    # U(0, 1) (L2P-pytorch's nn.init.uniform_): the range is used, not a small interval
    for p in (pool.prompts, pool.keys):
        assert p.min() >= 0 and p.max() <= 1 and p.min() < 0.1 and p.max() > 0.9
    jax = PromptPool(10, 5, 32, "jax")
    assert jax.prompts.min() >= 0 and jax.prompts.max() < 0.01 and jax.keys.max() < 0.01
    # only the no-weights line at the paper's settings; every other value is recorded
    assert [d for d in METHODS.get("l2p").deviations(cfg) if "pretrained" not in d] == []
    assert METHODS.get("l2p").label(cfg) == "l2p"


def test_code_values_are_recorded_as_deviations():
    cls = METHODS.get("l2p")
    cfg = build_config({"method": "l2p", **VIT_TINY, "pull_weight": 0.1, "batchwise_prompt": True,
                        "prompt_position": "before_cls"})
    devs = cls.deviations(cfg)
    assert any(d.startswith("pull_weight=0.1 instead of the paper's 0.5") for d in devs)
    assert any(d.startswith("batchwise_prompt=True instead of the paper's False") for d in devs)
    assert any(d.startswith("prompt_position=before_cls instead of the paper's after_cls") for d in devs)
    assert "pull_weight=0.1" in cls.label(cfg)
    prefix = build_config({"method": "l2p", **VIT_TINY, "l2p_variant": "prefix", "pool_size": 30,
                           "prompt_length": 20})
    devs = cls.deviations(prefix)
    assert any(d.startswith("l2p_variant=prefix instead of the paper's prompt_tuning") for d in devs)
    assert any("L2P++" in d and "not the paper's L2P" in d for d in devs)
    assert any(d.startswith("pool_size=30") for d in devs) and any(d.startswith("prompt_length=20") for d in devs)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=11), "top_k=11 selects more prompts than the pool holds"),
    (dict(l2p_variant="prefix", prompt_length=5), "prompt_length must be even"),
    (dict(backbone="resnet20", img_size=8), "not one"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(UserError, match=match):
        make_method("l2p", **kw)


# ---------------------------------------------------------------- matching and selection


def test_selected_ids_are_the_top_n_of_the_cosine_scores():
    m = built()
    x = images(8)
    q = query_features(m.net.vit, x)
    keys = m.net.prompts.keys
    cos = F.cosine_similarity(q[:, None, :], keys[None, :, :], dim=-1)
    scores, ids = m.select(q, None)
    torch.testing.assert_close(scores, cos, rtol=0, atol=1e-6)
    assert ids.shape == (8, 5)
    expected = cos.argsort(dim=1, descending=True)[:, :5]
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in expected.tolist()]
    assert len({tuple(sorted(r)) for r in ids.tolist()}) > 1, "the samples should not all pick the same prompts"


def test_the_prompted_pass_uses_exactly_the_selected_prompts():
    """Every unselected prompt set to NaN leaves a sample's features as they were; changing one
    selected prompt changes them."""
    m = built()
    x = images(4)
    with torch.no_grad():
        reference, _ = features(m, x)
        _, ids = m.select(query_features(m.net.vit, x), None)
        original = m.net.prompts.prompts.detach().clone()
        for b in range(4):
            unused = [i for i in range(10) if i not in ids[b].tolist()]
            m.net.prompts.prompts.copy_(original)
            m.net.prompts.prompts[unused] = float("nan")
            alone, _ = features(m, x[b:b + 1])
            torch.testing.assert_close(alone[0], reference[b], rtol=0, atol=1e-5)
            # (a random change: a constant shift of a token is removed by every LayerNorm)
            m.net.prompts.prompts[ids[b, 0]] += torch.randn(5, 32, generator=torch.Generator().manual_seed(b))
            changed, _ = features(m, x[b:b + 1])
            assert torch.isfinite(changed).all() and not torch.allclose(changed[0], reference[b], atol=1e-4)


def test_batchwise_selection_takes_the_most_frequent_ids_at_training_only():
    ids = torch.tensor([[3, 1], [1, 0], [4, 1], [0, 3], [2, 3]])  # counts: 1 and 3 thrice, 0 twice
    assert batchwise_ids(ids, 5, 2).tolist() == [[1, 3]] * 5
    assert batchwise_ids(torch.tensor([[2, 0], [0, 2], [4, 3]]), 5, 2).tolist() == [[0, 2]] * 3
    m = built(batchwise_prompt=True)
    q = query_features(m.net.vit, images(8))
    _, per_sample = m.select(q, None)  # at test: always per sample
    assert len({tuple(sorted(r)) for r in per_sample.tolist()}) > 1
    _, shared = m.select(q, m.scenario.tasks[0])
    counts = Counter(per_sample.reshape(-1).tolist())
    top = sorted(counts, key=lambda i: (-counts[i], i))[:5]
    assert shared.tolist() == [top] * 8


# ---------------------------------------------------------------- the loss


def test_pull_term_is_the_sum_of_the_selected_cosines_over_the_batch():
    m = built()
    m.net.train()
    task = m.scenario.tasks[0]
    x = images(6)
    q = query_features(m.net.vit, x)
    _, extra = m.prompted_features(x, q, task)
    _, ids = m.select(q, task)
    cos = F.cosine_similarity(q[:, None, :], m.net.prompts.keys[None, :, :], dim=-1)
    pull = sum(cos[b, i] for b in range(6) for i in ids[b].tolist()) / 6
    torch.testing.assert_close(extra, -0.5 * pull, rtol=1e-6, atol=1e-6)
    assert -5 <= pull.item() <= 5
    # its bounds: keys along the query give N, against it -N
    with torch.no_grad():
        m.net.prompts.keys.copy_(q[:1].expand(10, -1) * 3)
    assert pull_term(*m.select(q[:1], task)).item() == pytest.approx(5.0, abs=1e-5)
    with torch.no_grad():
        m.net.prompts.keys.mul_(-1)
    assert pull_term(*m.select(q[:1], task)).item() == pytest.approx(-5.0, abs=1e-5)
    # no pull term at test
    m.eval_mode()
    assert features(m, x)[1].item() == 0.0


def train_batch(m, task, n=6, seed=1):
    y = torch.arange(n) % task.size + task.start
    x = images(n, seed)
    return Batch(x=x, y=y, raw=x, index=torch.arange(n))


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix"])
def test_only_selected_prompts_their_keys_and_the_head_get_gradients(variant):
    m = built(l2p_variant=variant, pool_size=12, top_k=2, prompt_length=4)
    task = m.scenario.tasks[0]
    m.net.train()
    m.current_task = task
    batch = train_batch(m, task, n=3)
    loss, _, _ = m.step(batch)
    loss.backward()
    for name, p in m.net.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    _, ids = m.select(query_features(m.net.vit, batch.x), task)
    used = set(ids.reshape(-1).tolist())
    assert len(used) < 12
    pool = m.net.prompts
    for i in range(12):
        for grad in (pool.prompts.grad[i], pool.keys.grad[i]):
            assert (grad.abs().sum() > 0) == (i in used), i
            if i not in used:
                assert torch.count_nonzero(grad) == 0
    assert m.net.head.fc.weight.grad.abs().sum() > 0
    assert set(map(id, m.trainable())) == set(map(id, [*pool.parameters(), *m.net.head.parameters()]))


def test_logits_outside_the_task_are_masked_and_old_rows_get_no_gradient():
    m = built(tasks=2)
    task = m.scenario.tasks[1]
    m.net.train()
    m.current_task = task
    batch = train_batch(m, task)
    loss, logits, _ = m.step(batch)
    assert torch.isinf(logits[:, : task.start]).all() and torch.isfinite(logits[:, task.start:task.end]).all()
    q = query_features(m.net.vit, batch.x)
    feats, extra = m.prompted_features(batch.x, q, task)
    raw = m.net.head(feats)
    expected = F.cross_entropy(raw[:, task.start:task.end], batch.y - task.start) + extra
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    fc = m.net.head.fc
    assert torch.count_nonzero(fc.weight.grad[: task.start]) == 0 and torch.count_nonzero(fc.bias.grad[: task.start]) == 0
    assert fc.weight.grad[task.start:].abs().sum() > 0


def test_unselected_prompts_stay_bitwise_still_over_a_trained_task():
    """With the paper's optimiser (Adam without weight decay, re-created per task) and gradient
    clipping, a prompt (or key) that no batch selected never moves."""
    m = make_method("l2p", pool_size=20, top_k=2, prompt_grad_clip=1.0, opt_type="adam", lrate=0.01,
                    weight_decay=0.0)
    selected = set()
    real_select = m.select

    def recording(q, task):
        scores, ids = real_select(q, task)
        if task is not None:
            selected.update(ids.reshape(-1).tolist())
        return scores, ids

    m.select = recording
    task = m.scenario.tasks[0]
    m.begin_task(task)
    before = snapshot(m.net.prompts)
    m.train_task(task)
    after = snapshot(m.net.prompts)
    unused = [i for i in range(20) if i not in selected]
    assert selected and unused, "the test needs selected and unselected prompts"
    for i in unused:
        assert torch.equal(before["prompts"][i], after["prompts"][i]) and torch.equal(before["keys"][i], after["keys"][i])
    for i in selected:
        assert not torch.equal(before["prompts"][i], after["prompts"][i])
