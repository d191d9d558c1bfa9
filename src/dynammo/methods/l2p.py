"""L2P: Learning to Prompt (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022).

A frozen ViT and a pool of M learnable prompts P_m (Lp x D), each with a learnable key k_m (D).

- Query: q(x) = the CLS token of the same frozen ViT run without prompts, after the final norm (no
  gradient; `PromptMethod`).
- Matching: cosine similarity s_{b,m} = <q_b / |q_b|, k_m / |k_m|> (l2-normalisation as
  x * rsqrt(max(sum x^2, 1e-12)), the official code's); per sample, idx_b = the N best-matching ids.
- Prompt-tuning at the input: the N selected prompts (N * Lp tokens) go into the token sequence and the
  frozen blocks run over n + N * Lp tokens (`models/prompting.insert_prompts`). Default: the CVPR
  release's placement (the code of the paper's time, google-research/l2p 98b10ea, and L2P-pytorch):
  right after CLS, each prompt token carrying a copy of the CLS position embedding. Option
  `prompt_position=before_cls`: the later JAX release's placement, in front of CLS with no position
  embedding (google-research/l2p#33).
- Head input: the mean of the N * Lp prompt-token outputs after the final norm (the paper's and the
  code's `prompt` head; the CLS token is not used). Option `head_input=cls`: the CLS token.
- Loss: CE over the current task's logits (the others masked, `PromptMethod`) minus
  lambda * (1/B) sum_b sum_{i in idx_b} cos(q_b, k_i), the "surrogate" pull of the selected keys
  towards their queries; only the keys get its gradient. lambda = 0.5 is the paper's value (the
  author's reply in google-research/l2p#10) and the default; the CVPR code, L2P-pytorch and PILOT use
  0.1, the later JAX release 1.0 (`pull_weight`).
- Defaults M=10, Lp=5, N=5 (the paper's CIFAR-100 setting). Prompts and keys are initialised
  U(0, 1) as in L2P-pytorch (`nn.init.uniform_` of prompt.py, `prompt_init=pytorch`); the JAX code's
  flax `uniform()` is U[0, 0.01) (`prompt_init=jax`); `symmetric` is U(-1, 1), DualPrompt-pytorch's
  init (dynammo's L2P default before issue 22). Both official inits are all-positive, so the keys
  start nearly parallel and the first selections differ from a symmetric init's. The head is PyTorch's default-initialised linear layer (L2P-pytorch; the JAX
  code starts it at zero).
- Recipe of the official CIFAR-100 code: Adam (0.9, 0.999) without weight decay, constant learning rate
  0.03 x batch / 256, 5 epochs per task, gradient-norm clipping at 1.0 (`prompt_grad_clip`, default
  1.0). The optimiser is re-created every task; with Adam and weight_decay=0 a prompt or key that no
  batch of the task selects does not move (the framework's default weight decay would shrink it).

Where the official code differs from the paper, and which one is the default here:
- `batchwise_prompt`: the official CIFAR-100 config selects one prompt set per batch (the N ids most
  frequent among the batch's per-sample top-N) at training AND at test. At test that is a majority
  vote over a test batch drawn from one task: it leaks the task identity (google-research/l2p#28), so
  here selection at test is always per sample. The option (off by default, the paper's per-input
  selection) applies to training only.
- The paper's optional diversity penalty (a frequency-based penalty on prompts used by past tasks) is
  not in the official code (google-research/l2p#9) and is not implemented here; neither is the code's
  `use_prompt_mask` substitute (off for L2P in the official configs).
- lambda: 0.5 here (paper) vs 0.1 in the CVPR code.

L2P++ (`l2p_variant=prefix`): the method CODA-Prompt's repository (Smith et al., CVPR 2023) and the
reference framework call "L2P", which is a different method: the selected prompts are used as
prefix-tuning key/value prefixes at block 0 (each prompt's first Lp/2 vectors as keys, the last Lp/2 as
values; `models/prompting.run_blocks`), the sequence length stays n and the head reads the CLS token
(`head_input` and `prompt_position` have no effect). Its setting is pool 30, length 20, top-5 (set
pool_size=30 prompt_length=20). The pull term stays the one above; CODA's code uses sum_b (1 - cos)
and indexes the similarity matrix so that it sums B x B x N terms, which is not reproduced. Only block 0
("Deep L2P++", blocks 0-4, is not implemented). Runs with it are labelled and record it as a deviation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.prompt_base import PROMPT_OPTIONS, PromptMethod
from dynammo.models.prompting import embed_tokens, insert_prompts, run_blocks

L2P_OPTIONS = {
    **PROMPT_OPTIONS,
    "prompt_grad_clip": Option("float", 1.0, "clip the gradient norm of the prompts, keys and head to this value "
                                             "(the official recipe's 1.0; null: no clipping)", min=0.0,
                               min_open=True, nullable=True, faithful=1.0),
    "pool_size": Option("int", 10, "prompt pool size M (the paper: 10; L2P++: 30)", min=1, faithful=10),
    "prompt_length": Option("int", 5, "tokens per prompt Lp (the paper: 5; L2P++: 20 = 10 key + 10 value "
                                      "prefixes, must be even)", min=1, faithful=5),
    "top_k": Option("int", 5, "prompts selected per sample N (the paper: 5)", min=1, faithful=5),
    "pull_weight": Option("float", 0.5, "weight lambda of the key-query pull term (the paper: 0.5; the CVPR "
                                        "code, L2P-pytorch and PILOT: 0.1; the later JAX release: 1.0)",
                          min=0.0, faithful=0.5),
    "prompt_position": Option("str", "after_cls", "prompt-tuning only: where the prompts go: after_cls (the "
                                                  "CVPR release, each carrying the CLS position embedding) | "
                                                  "before_cls (the later JAX release, no position embedding)",
                              choices=("after_cls", "before_cls"), faithful="after_cls"),
    "head_input": Option("str", "prompt", "prompt-tuning only: the head reads prompt (the mean of the prompt "
                                          "tokens' outputs, the paper's) | cls (the CLS token)",
                         choices=("prompt", "cls"), faithful="prompt"),
    "batchwise_prompt": Option("bool", False, "training only: one prompt set per batch (the N ids most frequent "
                                              "among the samples' top-N), as the official CIFAR-100 config; it "
                                              "also votes at test, which leaks the task identity and is never "
                                              "done here (selection at test is per sample)", faithful=False),
    "prompt_init": Option("str", "pytorch", "initialisation of prompts and keys: pytorch (U(0, 1), L2P-pytorch's "
                                            "nn.init.uniform_) | jax (U[0, 0.01), the JAX code's flax uniform) | "
                                            "symmetric (U(-1, 1), DualPrompt-pytorch's; dynammo's default before)",
                          choices=("pytorch", "jax", "symmetric"), faithful="pytorch"),
    "l2p_variant": Option("str", "prompt_tuning", "prompt_tuning (the paper: prompts inserted at the input) | "
                                                  "prefix (L2P++ of the CODA-Prompt repository and the reference "
                                                  "framework, a different method: the selected prompts as "
                                                  "key/value prefixes at block 0, CLS head; its setting: "
                                                  "pool_size=30 prompt_length=20)",
                          choices=("prompt_tuning", "prefix"), faithful="prompt_tuning"),
}


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(max(sum x^2, 1e-12)) along the last axis (the official code's normalisation)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-12))


def match_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B, M) of the queries (B, D) to the keys (M, D)."""
    return l2_normalize(q) @ l2_normalize(keys).t()


def per_sample_ids(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, N): each sample's N best-matching prompt ids (best first)."""
    return scores.topk(top_k, dim=1).indices


def batchwise_ids(ids: torch.Tensor, pool_size: int, top_k: int) -> torch.Tensor:
    """(B, N): the N ids most frequent in the batch's (B, N) id matrix, the same row for every sample
    (ties: the smaller id first)."""
    counts = torch.bincount(ids.reshape(-1), minlength=pool_size)
    chosen = torch.sort(-counts, stable=True).indices[:top_k]
    return chosen.unsqueeze(0).expand(ids.shape[0], -1)


def pull_term(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_b sum_{i in ids_b} cos(q_b, k_i), in [-N, N]."""
    return scores.gather(1, ids).sum() / scores.shape[0]


INIT_RANGES = {"pytorch": (0.0, 1.0), "jax": (0.0, 0.01), "symmetric": (-1.0, 1.0)}  # U(low, high) per prompt_init


class PromptPool(nn.Module):
    """M prompts (M, Lp, D) and their keys (M, D)."""

    def __init__(self, pool_size: int, length: int, dim: int, init: str = "pytorch"):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim))
        self.keys = nn.Parameter(torch.empty(pool_size, dim))
        low, high = INIT_RANGES[init]
        with torch.no_grad():
            self.prompts.uniform_(low, high)
            self.keys.uniform_(low, high)

    @property
    def pool_size(self) -> int:
        return self.prompts.shape[0]

    @property
    def length(self) -> int:
        return self.prompts.shape[1]


@METHODS.register("l2p", aliases=("learning_to_prompt",))
class L2P(PromptMethod):
    summary = "prompt pool with key-query matching on a frozen ViT, prompts at the input, rehearsal-free (CVPR 2022)"
    options = L2P_OPTIONS
    paper_backbone = "ViT-B/16 pretrained on ImageNet-21k (the original in21k checkpoint)"

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        if cfg.top_k > cfg.pool_size:
            raise UserError(f"top_k={cfg.top_k} selects more prompts than the pool holds (pool_size={cfg.pool_size}); "
                            "lower top_k or raise pool_size")
        if cfg.l2p_variant == "prefix" and cfg.prompt_length % 2:
            raise UserError(f"l2p_variant=prefix splits each prompt into key and value prefixes of equal length, "
                            f"so prompt_length must be even (got {cfg.prompt_length}; L2P++ uses 20)")

    @classmethod
    def distributed_problem(cls, cfg):
        if cfg.batchwise_prompt:
            return "batchwise_prompt=true picks the prompts from the votes of the whole batch; set batchwise_prompt=false"
        return None

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        out = super().deviations(cfg)
        if cfg.l2p_variant == "prefix":
            out.append("l2p_variant=prefix is L2P++ (CODA-Prompt's repository, the reference framework), not the "
                       "paper's L2P: prefix-tuning at block 0 with a CLS head; its pull term is L2P's, not CODA's "
                       "sum of (1 - cos)")
        return out

    # ---- model ----
    def build_prompts(self, vit: nn.Module) -> nn.Module:
        return PromptPool(self.cfg.pool_size, self.cfg.prompt_length, int(vit.embed_dim), self.cfg.prompt_init)

    def select(self, q: torch.Tensor, task: Optional[Task]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cosine scores (B, M), selected ids (B, N)); batch-wise only while training, if asked."""
        pool = self.net.prompts
        scores = match_scores(q, pool.keys)
        ids = per_sample_ids(scores, self.cfg.top_k)
        if task is not None and self.cfg.batchwise_prompt:
            ids = batchwise_ids(ids, pool.pool_size, self.cfg.top_k)
        return scores, ids

    def prompted_features(self, x: torch.Tensor, q: torch.Tensor,
                          task: Optional[Task]) -> Tuple[torch.Tensor, torch.Tensor]:
        vit, pool = self.net.vit, self.net.prompts
        scores, ids = self.select(q, task)
        chosen = pool.prompts[ids]  # (B, N, Lp, D): unselected prompts get no gradient
        b, n_sel, length, dim = chosen.shape
        tokens = embed_tokens(vit, x)
        if self.cfg.l2p_variant == "prefix":
            half = length // 2
            prefix = (chosen[:, :, :half].reshape(b, n_sel * half, dim),
                      chosen[:, :, half:].reshape(b, n_sel * half, dim))
            feats = run_blocks(vit, tokens, {0: prefix})[:, 0]
        else:
            after_cls = self.cfg.prompt_position == "after_cls"
            n_prompt = n_sel * length
            out = run_blocks(vit, insert_prompts(vit, tokens, chosen.reshape(b, n_prompt, dim), after_cls))
            first = 1 if after_cls else 0  # the first prompt position
            if self.cfg.head_input == "prompt":
                feats = out[:, first:first + n_prompt].mean(dim=1)
            else:
                feats = out[:, 0 if after_cls else n_prompt]
        if task is None:
            return feats, feats.new_zeros(())
        return feats, -self.cfg.pull_weight * pull_term(scores, ids)
