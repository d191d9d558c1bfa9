"""The prompted ViT driver (models/prompting.py) against timm's own forward, on a tiny ViT."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from dynammo.models.prompting import (block_forward, embed_tokens, insert_prompts, prefix_attention,
                                      prefixed_features, query_features, run_blocks, split_heads)


def tiny_vit(fused: bool = True) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=4, mlp_ratio=2,
                            num_classes=0, global_pool="token", qkv_bias=True).eval()
    for block in vit.blocks:
        block.attn.fused_attn = fused
    return vit


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [True, False])
def test_no_prefix_is_timms_forward(images, fused):
    vit = tiny_vit(fused)
    with torch.no_grad():
        ours = run_blocks(vit, embed_tokens(vit, images))
        torch.testing.assert_close(ours, vit.forward_features(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(prefixed_features(vit, images, {}), vit.forward_features(images)[:, 0],
                                   rtol=0, atol=1e-6)


def test_query_has_no_gradient_and_is_the_unprompted_cls(images):
    vit = tiny_vit()
    q = query_features(vit, images)
    assert not q.requires_grad
    torch.testing.assert_close(q, vit.forward_features(images)[:, 0].detach())


def test_zero_length_prefix_changes_nothing(images):
    vit = tiny_vit()
    empty = torch.zeros(3, 0, 32)
    with torch.no_grad():
        out = prefixed_features(vit, images, {0: (empty, empty), 3: (empty, empty)})
        torch.testing.assert_close(out, vit.forward_features(images)[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_equals_attention_over_extra_tokens(images, fused):
    """Keys/values of extra tokens z used as the prefix must give full attention over cat[z, x],
    restricted to the rows of x (catches a wrong head split or K/V order)."""
    vit = tiny_vit(fused)
    attn = vit.blocks[2].attn
    h = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(2))
    z = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        zk, zv = attn.qkv(z).reshape(3, 4, 3, 32).unbind(2)[1:]  # (B, 4, D) projected keys, values
        ours = prefix_attention(attn, h, (zk, zv))
        full = attn(torch.cat([z, h], dim=1))[:, 4:]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_prefix_at_one_block_leaves_earlier_blocks_untouched(images):
    vit = tiny_vit()
    torch.manual_seed(4)
    prefix = (torch.randn(3, 2, 32), torch.randn(3, 2, 32))
    with torch.no_grad():
        plain = [embed_tokens(vit, images)]
        prompted = [embed_tokens(vit, images)]
        for i, block in enumerate(vit.blocks):
            plain.append(block(plain[-1]))
            prompted.append(block_forward(block, prompted[-1], prefix if i == 2 else None))
    for i in range(3):  # the inputs of blocks 0..2 and the output of block 1
        assert torch.equal(plain[i], prompted[i])
    assert not torch.allclose(plain[3], prompted[3]) and prompted[3].shape == plain[3].shape


def test_keys_and_values_are_not_interchangeable(images):
    vit = tiny_vit()
    torch.manual_seed(5)
    pk, pv = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    with torch.no_grad():
        a = prefixed_features(vit, images, {0: (pk, pv)})
        b = prefixed_features(vit, images, {0: (pv, pk)})
    assert not torch.allclose(a, b)


def test_shared_prefix_broadcasts_and_heads_split_in_qkv_order():
    p = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    heads = split_heads(p, 4)
    assert heads.shape == (2, 4, 3, 2) and torch.equal(heads[1, 2, 0], p[1, 0, 4:6])
    vit = tiny_vit()
    h = torch.randn(3, 17, 32)
    one = (torch.randn(1, 2, 32), torch.randn(1, 2, 32))
    with torch.no_grad():
        shared = prefix_attention(vit.blocks[0].attn, h, one)
        repeated = prefix_attention(vit.blocks[0].attn, h, tuple(t.expand(3, -1, -1) for t in one))
    torch.testing.assert_close(shared, repeated, rtol=0, atol=0)


def test_l2p_prompts_carry_the_cls_position_embedding(images):
    vit = tiny_vit()
    tokens = embed_tokens(vit, images)
    prompts = torch.zeros(3, 5, 32)
    cvpr = insert_prompts(vit, tokens, prompts, cls_position=True)
    assert cvpr.shape == (3, 22, 32) and torch.equal(cvpr[:, 0], tokens[:, 0]) and torch.equal(cvpr[:, 6:], tokens[:, 1:])
    assert torch.equal(cvpr[:, 1:6], vit.pos_embed[:, :1].expand(3, 5, -1))
    jax = insert_prompts(vit, tokens, prompts, cls_position=False)
    assert torch.equal(jax[:, :5], prompts) and torch.equal(jax[:, 5:], tokens)
