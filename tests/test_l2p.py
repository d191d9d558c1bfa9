"""L2P (methods/l2p.py) on the tiny vit_cpu: matching, selection, the pull term, where the prompts go,
what the head reads, gradients, masking, batch independence, the two passes and their cost, and the
L2P++ prefix variant (spec ../shared/research/prompt_methods.md, sections 1, 7 and 9)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.configure import build_config
from dynammo.cost import count_flops
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods import l2p as l2p_module
from dynammo.methods.l2p import PromptPool, batchwise_ids, pull_term
from dynammo.models.prompting import embed_tokens, query_features, run_blocks

import method_helpers
from method_helpers import VIT_TINY, make_method, run_task, snapshot

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


# ---------------------------------------------------------------- the prompted sequence


@pytest.mark.parametrize("position", ["after_cls", "before_cls"])
def test_prompt_tokens_placement_and_position_embedding(position):
    m = built(prompt_position=position)
    vit = m.net.vit
    x = images(3)
    seen = []
    with torch.no_grad():
        q = query_features(vit, x)
        hook = capture(vit.blocks[0], seen, pre=True)
        m.prompted_features(x, q, None)  # the prompted pass alone
        hook.remove()
        _, ids = m.select(q, None)
        plain = embed_tokens(vit, x)
    assert len(seen) == 1
    tokens = seen[0]
    n, n_prompt = n_tokens(m), 5 * 5
    assert tokens.shape == (3, n + n_prompt, 32)
    chosen = m.net.prompts.prompts.detach()[ids].reshape(3, n_prompt, 32)
    if position == "after_cls":  # CVPR release: [CLS, prompts + pos_embed[:, 0], patches]
        assert torch.equal(tokens[:, :1], plain[:, :1]) and torch.equal(tokens[:, 1 + n_prompt:], plain[:, 1:])
        torch.testing.assert_close(tokens[:, 1:1 + n_prompt], chosen + vit.pos_embed[:, :1], rtol=0, atol=0)
        assert not torch.allclose(tokens[:, 1:1 + n_prompt], chosen)
    else:  # JAX HEAD: [prompts (no position embedding), CLS, patches]
        assert torch.equal(tokens[:, :n_prompt], chosen) and torch.equal(tokens[:, n_prompt:], plain)


@pytest.mark.parametrize("position", ["after_cls", "before_cls"])
def test_the_head_reads_the_mean_of_the_prompt_positions(position):
    """The final norm's output at every non-prompt position is replaced by noise: the head input is
    bitwise unchanged; it is the mean of the prompt positions, and one prompt position changes it."""
    m = built(prompt_position=position)
    norm = m.net.vit.norm
    x = images(3)
    n_prompt = 25
    first = 1 if position == "after_cls" else 0
    prompt_slots = torch.zeros(n_tokens(m) + n_prompt, dtype=torch.bool)
    prompt_slots[first:first + n_prompt] = True
    seen = []

    def perturb(slots):
        def hook(mod, args, out):
            seen.append(out.detach().clone())
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
            return torch.where(slots[None, :, None], noise, out)
        return norm.register_forward_hook(hook)

    with torch.no_grad():
        q = query_features(m.net.vit, x)  # the hooks below touch the prompted pass only
        reference, _ = m.prompted_features(x, q, None)
        hook = perturb(~prompt_slots)
        noisy_rest, _ = m.prompted_features(x, q, None)
        hook.remove()
        one = torch.zeros_like(prompt_slots)
        one[first + 3] = True
        hook = perturb(one)
        noisy_prompt, _ = m.prompted_features(x, q, None)
        hook.remove()
    assert len(seen) == 2 and seen[0].shape == (3, n_tokens(m) + n_prompt, 32)
    assert torch.equal(noisy_rest, reference)
    torch.testing.assert_close(reference, seen[0][:, prompt_slots].mean(dim=1), rtol=0, atol=1e-6)
    assert not torch.allclose(noisy_prompt, reference)


@pytest.mark.parametrize("position", ["after_cls", "before_cls"])
def test_cls_head_reads_the_cls_token(position):
    m = built(prompt_position=position, head_input="cls")
    x, seen = images(3), []
    with torch.no_grad():
        q = query_features(m.net.vit, x)
        hook = capture(m.net.vit.norm, seen)
        feats, _ = m.prompted_features(x, q, None)
        hook.remove()
    assert len(seen) == 1 and seen[0].shape[1] == n_tokens(m) + 25
    assert torch.equal(feats, seen[0][:, 0 if position == "after_cls" else 25])


@pytest.mark.parametrize("variant, kw", [("prompt_tuning", dict(head_input="cls")),
                                         ("prompt_tuning", dict(head_input="cls", prompt_position="before_cls")),
                                         ("prefix", dict(prompt_length=4))])
def test_no_prompt_tokens_give_the_frozen_models_cls(variant, kw):
    """With N * Lp = 0 prompt tokens (a pool of zero-length prompts) the prompted pass is the frozen
    ViT's own forward: the features equal its CLS, i.e. the query."""
    m = built(l2p_variant=variant, **kw)
    m.net.prompts = PromptPool(10, 0, 32)
    x = images(4)
    with torch.no_grad():
        feats, _ = features(m, x)
        frozen = m.net.vit.forward_features(x)[:, 0]
    torch.testing.assert_close(feats, frozen, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats, m.net.backbone(x), rtol=0, atol=1e-6)


def test_prefix_variant_uses_the_selected_prompts_as_block_0_keys_and_values(monkeypatch):
    m = built(l2p_variant="prefix", prompt_length=4)
    x = images(3)
    given = []
    real = l2p_module.run_blocks

    def spy(vit, tokens, prefixes=None):
        given.append((tokens.shape, prefixes))
        return real(vit, tokens, prefixes)

    monkeypatch.setattr(l2p_module, "run_blocks", spy)
    seen = []
    with torch.no_grad():
        q = query_features(m.net.vit, x)
        hook = capture(m.net.vit.norm, seen)
        feats, _ = m.prompted_features(x, q, None)
        hook.remove()
        _, ids = m.select(q, None)
    assert len(given) == len(seen) == 1
    shape, prefixes = given[0]
    assert shape == (3, n_tokens(m), 32) and list(prefixes) == [0]  # the sequence keeps its n tokens
    chosen = m.net.prompts.prompts.detach()[ids]  # (B, N, 4, D)
    assert torch.equal(prefixes[0][0], chosen[:, :, :2].reshape(3, 10, 32))
    assert torch.equal(prefixes[0][1], chosen[:, :, 2:].reshape(3, 10, 32))
    assert torch.equal(feats, seen[0][:, 0])  # CLS head
    swapped = real(m.net.vit, embed_tokens(m.net.vit, x), {0: prefixes[0][::-1]})[:, 0]
    assert not torch.allclose(swapped, feats)


# ---------------------------------------------------------------- inference


def test_query_pass_is_the_unprompted_cls_and_ignores_the_prompts():
    m = built()
    x = images(3)
    q = query_features(m.net.vit, x)
    assert not q.requires_grad
    torch.testing.assert_close(q, m.net.vit.forward_features(x)[:, 0].detach())
    with torch.no_grad():
        m.net.prompts.prompts.normal_()
        m.net.prompts.keys.normal_()
    assert torch.equal(q, query_features(m.net.vit, x))


@pytest.mark.parametrize("kw", [{}, dict(batchwise_prompt=True), dict(l2p_variant="prefix", prompt_length=4)])
def test_eval_logits_are_batch_independent(kw):
    m = built(tasks=2, **kw)
    x = images(7)
    with torch.no_grad():
        batch = m.predict(x)["logits"]
        alone = torch.cat([m.predict(x[i:i + 1])["logits"] for i in range(7)])
        perm = torch.tensor([3, 6, 0, 2, 5, 1, 4])
        permuted = m.predict(x[perm])["logits"]
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(permuted, batch[perm], rtol=0, atol=1e-5)


def vit_macs(vit, n: int, extra_kv: dict) -> int:
    """The spec's section 7 formula for one pass: patch embedding + per block 4nD^2 (qkv, proj) +
    2rnD^2 (MLP, ratio r) + 2n(n + e_l)D (attention over n + e_l keys)."""
    dim = vit.embed_dim
    ratio = vit.blocks[0].mlp.fc1.out_features // dim
    patch = vit.patch_embed.proj
    macs = vit.patch_embed.num_patches * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
    for layer in range(len(vit.blocks)):
        e = extra_kv.get(layer, 0)
        macs += 4 * n * dim * dim + 2 * ratio * n * dim * dim + 2 * n * (n + e) * dim
    return macs


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix"])
def test_cost_is_the_query_pass_plus_the_prompted_pass(variant):
    """count_flops of predict = the query pass at n tokens + the prompted pass (n + N*Lp tokens for
    prompt-tuning; n tokens and N*Lp/2 key/value prefixes at block 0 for L2P++) + matching and head."""
    m = built(tasks=2, l2p_variant=variant, prompt_length=4)
    vit, x = m.net.vit, images(1)
    n, dim, pool, top_k, length = n_tokens(m), 32, 10, 5, 4
    classes = m.net.head.num_classes
    total = count_flops(m.predict, x)
    query = count_flops(lambda t: query_features(vit, t), x)
    patches = count_flops(vit.patch_embed, x)
    if variant == "prompt_tuning":
        blocks = count_flops(lambda t: run_blocks(vit, t), torch.zeros(1, n + top_k * length, dim))
        prompted_macs = vit_macs(vit, n + top_k * length, {})
    else:
        kv = torch.zeros(1, top_k * length // 2, dim)
        blocks = count_flops(lambda t: run_blocks(vit, t, {0: (kv, kv)}), torch.zeros(1, n, dim))
        prompted_macs = vit_macs(vit, n, {0: top_k * length // 2})
    assert query == pytest.approx(2 * vit_macs(vit, n, {}), rel=0.01)
    assert total == query + patches + blocks + 2 * pool * dim + 2 * dim * classes
    assert total == pytest.approx(2 * (vit_macs(vit, n, {}) + prompted_macs), rel=0.01)


# ---------------------------------------------------------------- end to end


def test_a_tiny_run_records_accuracy_for_every_task(tiny_run):
    run_dir = tiny_run("l2p")
    r = json.loads((run_dir / "results.json").read_text())
    assert r["status"] == "complete" and len(r["acc"]) == len(r["tasks"]) == 3
    assert all(0 <= a <= 100 for a in r["acc"])


def test_a_tiny_l2p_plus_plus_run(run_in_process, tmp_path):
    args = method_helpers.tiny_run_args("l2p", l2p_variant="prefix", prompt_length=4)
    assert run_in_process("run", "--out", str(tmp_path / "run"), *args) == 0
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(r["acc"]) == 3 and any("L2P++" in d for d in r["deviations"])


def test_checkpoint_round_trip_gives_the_same_predictions():
    m = make_method("l2p")
    run_task(m, m.scenario.tasks[0])
    m.eval_mode()
    x = images(3)
    with torch.no_grad():
        before = m.predict(x)["logits"]
    other = make_method("l2p", seed=5)
    other.load_state_dict(m.state_dict())
    other.eval_mode()
    with torch.no_grad():
        assert torch.equal(other.predict(x)["logits"], before)
