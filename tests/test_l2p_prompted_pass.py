"""L2P (methods/l2p.py) on the tiny vit_cpu, its prompted pass: where the prompts go (prompt tokens
or prefix), what the head reads, the query pass, batch independence, the cost of the two passes, and
tiny runs with a checkpoint round trip (matching, selection, the loss: tests/test_l2p.py; spec
../shared/research/prompt_methods.md, sections 1, 7 and 9)."""
from __future__ import annotations

import json

import pytest
import torch

from dynammo.cost import count_flops
from dynammo.methods import l2p as l2p_module
from dynammo.methods.l2p import PromptPool
from dynammo.models.prompting import embed_tokens, query_features, run_blocks

import method_helpers
from method_helpers import make_method, run_task
from test_l2p import built, capture, features, images, n_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


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
