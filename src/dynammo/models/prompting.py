"""Running a frozen timm VisionTransformer with prompts, without forking or patching it.

The prompt methods (L2P, DualPrompt, CODA-Prompt) need three things from the ViT:
- the query: the CLS token of the frozen ViT run WITHOUT prompts, after the final LayerNorm
  (`forward_features(x)[:, 0]`), computed without gradients;
- prompt-tuning (L2P, Wang et al. CVPR 2022): prompt tokens inserted into the token sequence;
- prefix-tuning (DualPrompt, Wang et al. ECCV 2022; CODA-Prompt, Smith et al. CVPR 2023): at listed
  blocks, extra keys and values concatenated in front of the block's own keys and values AFTER the
  qkv projection (raw prefixes: no projection, no LayerNorm), so the sequence length is unchanged.

The blocks are driven functionally from timm's own submodules (`norm1, attn.qkv, attn.proj, ls1,
drop_path1, norm2, mlp, ls2, drop_path2`): the state dict and the weights stay timm's, and one
backbone serves both passes. Prefixes are given per block as (key prefix, value prefix), each
(B, L, D) (split into heads here in qkv's order) or already (B, H, L, D/H).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Prefix = Tuple[torch.Tensor, torch.Tensor]


def split_heads(p: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D/H), splitting D into heads in the order qkv's output uses."""
    if p.dim() == 4:
        return p
    b, length, dim = p.shape
    return p.reshape(b, length, num_heads, dim // num_heads).transpose(1, 2)


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image -> the token sequence the first block sees (patches, CLS, position embedding)."""
    x = vit._pos_embed(vit.patch_embed(x))
    return vit.norm_pre(vit.patch_drop(x))


@torch.no_grad()
def query_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The prompt methods' query q(x): CLS of the unprompted frozen ViT after the final norm."""
    return vit.forward_features(x)[:, 0]


def prefix_attention(attn: nn.Module, h: torch.Tensor, prefix: Optional[Prefix]) -> torch.Tensor:
    """timm Attention on (already normalised) tokens h, with raw key/value prefixes in front of its
    keys and values. Without a prefix it computes what `attn(h)` computes."""
    b, n, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        pk, pv = (split_heads(p, heads).to(k.dtype) for p in prefix)
        if pk.shape[0] == 1 and b > 1:  # one prefix shared by the batch
            pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    norm = getattr(attn, "norm", None)  # timm's scale_norm (Identity unless asked for)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def block_forward(block: nn.Module, x: torch.Tensor, prefix: Optional[Prefix]) -> torch.Tensor:
    """One timm ViT block, its attention given a prefix (the block's own forward when there is none)."""
    if prefix is None:
        return block(x)
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def run_blocks(vit: nn.Module, tokens: torch.Tensor, prefixes: Optional[Mapping[int, Prefix]] = None) -> torch.Tensor:
    """All blocks (prefixes at the listed block indices) and the final norm -> (B, n, D) tokens."""
    prefixes = prefixes or {}
    for i, block in enumerate(vit.blocks):
        tokens = block_forward(block, tokens, prefixes.get(i))
    return vit.norm(tokens)


def prefixed_features(vit: nn.Module, x: torch.Tensor, prefixes: Mapping[int, Prefix]) -> torch.Tensor:
    """CLS after the final norm of the ViT run with prefixes (DualPrompt's and CODA's head input)."""
    return run_blocks(vit, embed_tokens(vit, x), prefixes)[:, 0]


def insert_prompts(vit: nn.Module, tokens: torch.Tensor, prompts: torch.Tensor, cls_position: bool) -> torch.Tensor:
    """L2P's prompt-tuning: prompts (B, P, D) put into the embedded sequence.

    cls_position=True (the CVPR release, L2P-pytorch): right after CLS, each carrying a copy of the
    CLS position embedding. False (the later JAX release): in front of CLS, no position embedding.
    """
    if cls_position:
        pos = vit.pos_embed[:, :1].to(prompts.dtype)
        return torch.cat([tokens[:, :1], prompts + pos, tokens[:, 1:]], dim=1)
    return torch.cat([prompts, tokens], dim=1)

