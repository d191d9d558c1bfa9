"""CODA-Prompt: attention-weighted sums of prompt components, prefix-tuning a frozen ViT (Smith et
al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual
Learning", CVPR 2023).

At every prompted block l (`prompt_layers`, blocks 0-4) the method keeps M components
P_l (M x Lp x D), keys K_l (M x D) and attention vectors A_l (M x D); each of the T tasks of the
scenario owns M/T of them, task t the rows [s, f) = [t M/T, (t+1) M/T).

- Query q: the CLS token of the frozen ViT run without prompts, after the final norm (no gradient).
- Weights alpha_{b,m} = cos(q_b * A_m, K_m) (q times A elementwise, both sides l2-normalised, no
  softmax), for m < f. Prompt p_b = sum_m alpha_{b,m} P_m (Lp x D); its first Lp/2 rows are the key
  prefix and the last Lp/2 the value prefix of block l (raw prefixes after the qkv projection,
  `models/prompting`). That is 4 K/V prefixes at 5 blocks with the paper's Lp = 8.
- Head: one linear layer over the seen classes on the CLS token after the final norm. Training masks
  the logits of every class outside the current task; test takes the argmax over the seen classes.
- Loss: CE + mu * sum_l [O(K_l) + O(A_l) + O(P_l flattened to M x Lp D)], O(X) = mean((X X^T - I)^2)
  over rows [0, f), training only.
- Freezing: during task t the matrices are cat(X[:s].detach(), X[s:f]); old components take part
  but never get a gradient, components >= f do not exist yet. At test, rows [0, f) of the last task.
  Here every task's rows are their own Parameters, created when the task starts (`grow` rebuilds
  them without data), and only the current task's go to the optimiser: old rows cannot move even
  with weight decay. The official code stores all M rows from the start; the parameter count of
  `dynammo cost` therefore grows task by task here (the same 5 (M Lp D + 2 M D) after the last task).
- Schedule (`coda_schedule=coda_cos`): the official cosine lr(e) = lrate cos(99 pi e / (200 (E - 1)))
  per epoch e of E (E = 1: constant), no warm-up; `config` uses the framework's `scheduler` key.

Where the official code (GT-RIPL/CODA-Prompt) differs from the paper, and what is the default here:
- Initialisation (`component_init`). The paper and the paper-time code (commit 22948d2) initialise
  all M rows orthogonally at the start (nn.init.orthogonal_, P flattened) = `orthogonal`. The current
  official code re-initialises task t's rows at its start by Gram-Schmidt: random normal vectors
  orthogonalised against every earlier row, then normalised (task 0's rows at construction) =
  `gram_schmidt`, a named option (recorded as a deviation from the paper; the authors report it has
  little effect on performance). The default is the paper's `orthogonal`. Here the Gram-Schmidt is done in float64 against an orthonormal
  basis of the earlier rows (twice, for round-off), so new rows are orthogonal to trained old rows
  even when those are no longer orthogonal to each other (the official classical Gram-Schmidt
  subtracts projections onto the old rows one by one, which is exact only for orthogonal old rows).
  Both draw from a generator seeded from the run's seed (and the task), never the global RNG.
- Orthogonality weight `ortho_mu`: the paper and its scripts say 0.1, but the paper-time code (22948d2)
  multiplies the penalty by 1e-6 inside `ortho_penalty`, so the published numbers were made with an
  effective weight of 0.1 x 1e-6 = 1e-7: the default (`ortho_mu=0.1` is the paper's text without the
  factor, 10^6 times stronger, run by neither code); the current code drops the factor and its scripts
  use 0.0 ("with updated code, now can be 0").
- M must be a multiple of the number of tasks (the official code floors M / T and leaves the rest
  unused; here that is an error) and at most the width D (orthogonal keys; the official
  Gram-Schmidt cannot make more than D orthogonal rows and restarts on the near-zero remainder).
- The official schedule divides by E - 1 (E = 1 fails); here E = 1 keeps the rate constant.

Recipe of the paper (CIFAR-100 and ImageNet-R, 10 tasks): Adam (0.9, 0.999), lrate 1e-3, no weight
decay, batch 128, 20 (CIFAR) / 50 (ImageNet-R) epochs, this cosine schedule, no gradient clipping,
M = 100, Lp = 8, mu = 0.1 x 1e-6; ViT-B/16 IN-21k pretrained, IN-1k fine-tuned.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.prompt_base import PROMPT_OPTIONS, CodaCosine, PromptMethod, coda_cosine_factor  # noqa: F401
from dynammo.models.prompting import prefixed_features

CODA_OPTIONS: Dict[str, Option] = {
    **PROMPT_OPTIONS,
    "prompt_grad_clip": dataclasses.replace(PROMPT_OPTIONS["prompt_grad_clip"], faithful=None),
    "components": Option("int", 100, "prompt components M per prompted block (each task owns M / number of "
                                     "tasks; M must be a multiple of the task count and at most the ViT width)",
                         min=1, faithful=100),
    "prompt_length": Option("int", 8, "length Lp of a component (Lp/2 key and Lp/2 value prefixes; even)",
                            min=2, faithful=8),
    "prompt_layers": Option("int_list", [0, 1, 2, 3, 4], "ViT blocks that get a prefix",
                            min=0, nonempty=True, unique=True, faithful=[0, 1, 2, 3, 4]),
    "ortho_mu": Option("float", 1e-7, "weight of the orthogonality penalty on K, A and P (1e-7: the paper's 0.1 "
                                      "times the 1e-6 its code applied, the weight behind the published numbers; "
                                      "0.1 without that factor; the current official scripts use 0)",
                       min=0.0, faithful=1e-7),
    "component_init": Option("str", "orthogonal",
                             "gram_schmidt (the current official code: each task's rows drawn at its start, "
                             "orthogonal to every earlier row) | orthogonal (the paper: all rows orthogonal "
                             "at the start)", choices=("gram_schmidt", "orthogonal"), faithful="orthogonal"),
    "coda_schedule": dataclasses.replace(PROMPT_OPTIONS["coda_schedule"], default="coda_cos", faithful="coda_cos"),
}


# ---------------------------------------------------------------- initialisation


def _generator(seed, *salt: int) -> torch.Generator:
    """A CPU generator seeded from the run's seed and `salt` (the global RNG is left alone)."""
    value = int(seed[0] if isinstance(seed, (list, tuple)) else seed)
    for s in salt:
        value = (value * 1_000_003 + 7919 * (s + 1)) % (2 ** 62)
    return torch.Generator().manual_seed(value)


def gram_schmidt(old: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random unit rows (float64), orthogonal to each other and to every row of `old` (n, d)."""
    d = old.shape[1]
    if old.shape[0] + count > d:
        raise ValueError(f"{old.shape[0] + count} orthogonal rows do not fit in {d} dimensions")
    basis = torch.linalg.qr(old.detach().cpu().double().T, mode="reduced")[0] if old.shape[0] else \
        torch.zeros(d, 0, dtype=torch.float64)
    rows = []
    for _ in range(count):
        v = torch.randn(d, generator=generator, dtype=torch.float64)
        for _ in range(2):  # "twice is enough" re-orthogonalisation
            v = v - basis @ (basis.T @ v)
        v = v / v.norm()
        rows.append(v)
        basis = torch.cat([basis, v[:, None]], dim=1)
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=torch.float64)


def orthogonal_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal (rows x cols) matrix as nn.init.orthogonal_ draws it (QR of a normal matrix,
    signs fixed by R's diagonal), from `generator`."""
    flat = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    if rows < cols:
        flat = flat.T
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r))
    return q.T if rows < cols else q


def ortho_penalty(x: torch.Tensor) -> torch.Tensor:
    """mean((X X^T - I)^2) of the rows of X (n, d): 0 for orthonormal rows."""
    return ((x @ x.T - torch.eye(x.shape[0], dtype=x.dtype, device=x.device)) ** 2).mean()


# ---------------------------------------------------------------- the prompt module


class CodaPrompts(nn.Module):
    """Per prompted block: components P (M, Lp, D), keys K (M, D), attention vectors A (M, D), stored
    as one Parameter per task (`keys[i][t]` = rows [t M/T, (t+1) M/T) of block layers[i]'s K)."""

    def __init__(self, dim: int, layers: List[int], per_task: int, length: int):
        super().__init__()
        self.dim, self.layers, self.per_task, self.length = dim, list(layers), per_task, length
        self.keys = nn.ModuleList(nn.ParameterList() for _ in self.layers)
        self.attn = nn.ModuleList(nn.ParameterList() for _ in self.layers)
        self.components = nn.ModuleList(nn.ParameterList() for _ in self.layers)

    @property
    def num_tasks(self) -> int:
        return len(self.keys[0])

    def add_task(self, rows: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """One (K, A, P) block of rows per prompted layer, for the next task."""
        for i, (k, a, p) in enumerate(rows):
            self.keys[i].append(nn.Parameter(k))
            self.attn[i].append(nn.Parameter(a))
            self.components[i].append(nn.Parameter(p))

    def task_parameters(self, t: int) -> List[nn.Parameter]:
        return [group[i][t] for group in (self.keys, self.attn, self.components) for i in range(len(self.layers))]

    def matrices(self, i: int, trained: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's K (f, D), A (f, D), P (f, Lp, D): trained=None: the rows of every task built (test);
        trained=t: rows [0, (t+1) M/T), those of tasks < t detached (training task t)."""
        def cat(chunks):
            chunks = list(chunks)
            if trained is not None:
                chunks = [c.detach() if j < trained else c for j, c in enumerate(chunks[: trained + 1])]
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)

        return cat(self.keys[i]), cat(self.attn[i]), cat(self.components[i])


def component_weights(q: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """alpha (B, f): alpha_{b,m} = cos(q_b * A_m, K_m)."""
    aq = F.normalize(torch.einsum("bd,md->bmd", q, attn), dim=2)
    return torch.einsum("bmd,md->bm", aq, F.normalize(keys, dim=1))


@METHODS.register("coda_prompt", aliases=("coda", "coda-prompt", "codaprompt"))
class CODAPrompt(PromptMethod):
    summary = ("frozen ViT + attention-weighted sums of per-task prompt components as K/V prefixes at "
               "blocks 0-4, orthogonality penalty (CVPR 2023)")
    options = CODA_OPTIONS
    paper_backbone = "ViT-B/16 pretrained on ImageNet-21k and fine-tuned on ImageNet-1k"

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        if cfg.prompt_length % 2:
            raise UserError(f"prompt_length={cfg.prompt_length} must be even (half key, half value prefixes); "
                            f"use {cfg.prompt_length + 1}")
        # components vs the task count and the width: checked when the prompts are built (the scenario's
        # real tasks, a dataset stream included), still before the runner writes anything

    # ---- model ----
    def build_prompts(self, vit: nn.Module) -> nn.Module:
        cfg = self.cfg
        tasks = len(self.scenario.tasks)
        depth, dim = len(vit.blocks), int(vit.embed_dim)
        check_components(cfg.components, tasks, dim)
        bad = [layer for layer in cfg.prompt_layers if layer >= depth]
        if bad:
            raise UserError(f"prompt_layers {bad} do not exist: the ViT has blocks 0..{depth - 1}")
        if cfg.prompt_length % 2:
            raise UserError(f"prompt_length={cfg.prompt_length} must be even")
        return CodaPrompts(dim, sorted(cfg.prompt_layers), cfg.components // tasks, cfg.prompt_length)

    def start_task(self, task: Task) -> None:
        """Create the task's rows of K, A and P (deterministic from the seed; no data)."""
        prompts: CodaPrompts = self.net.prompts
        if prompts.num_tasks > task.id:  # already built (begin_task after grow)
            return
        if prompts.num_tasks != task.id:
            raise RuntimeError(f"CODA-Prompt: task {task.id} started after {prompts.num_tasks} tasks")
        n, d, length = prompts.per_task, prompts.dim, prompts.length
        s, f = task.id * n, (task.id + 1) * n
        device = next(self.net.vit.parameters()).device
        rows = []
        if self.cfg.component_init == "gram_schmidt":
            g = _generator(self.cfg.seed, task.id)
            for i in range(len(prompts.layers)):
                k_old, a_old, p_old = prompts.matrices(i, None) if task.id else (
                    torch.zeros(0, d), torch.zeros(0, d), torch.zeros(0, length, d))
                k = gram_schmidt(k_old, n, g)
                a = gram_schmidt(a_old, n, g)
                p = gram_schmidt(p_old.reshape(p_old.shape[0], length * d), n, g).reshape(n, length, d)
                rows.append((k, a, p))
        else:  # the paper: one orthogonal matrix of all M rows per parameter, drawn once from the seed
            m = prompts.per_task * len(self.scenario.tasks)
            for i in range(len(prompts.layers)):
                k = orthogonal_rows(m, d, _generator(self.cfg.seed, -1, i, 0))[s:f]
                a = orthogonal_rows(m, d, _generator(self.cfg.seed, -1, i, 1))[s:f]
                p = orthogonal_rows(m, length * d, _generator(self.cfg.seed, -1, i, 2))[s:f].reshape(n, length, d)
                rows.append((k, a, p))
        prompts.add_task([tuple(x.to(device=device, dtype=torch.float32) for x in r) for r in rows])

    # ---- forward ----
    def prefixes(self, q: torch.Tensor, task: Optional[Task]):
        """{block: (key prefix, value prefix)} and the orthogonality term (0 at test)."""
        prompts: CodaPrompts = self.net.prompts
        trained = None if task is None else task.id
        out, penalty = {}, q.new_zeros(())
        for i, layer in enumerate(prompts.layers):
            keys, attn, comps = prompts.matrices(i, trained)  # rows [0, f): every task built so far
            alpha = component_weights(q, keys, attn)
            p = torch.einsum("bm,mld->bld", alpha, comps)
            half = comps.shape[1] // 2
            out[layer] = (p[:, :half], p[:, half:])
            if task is not None and self.cfg.ortho_mu > 0:
                penalty = penalty + ortho_penalty(keys) + ortho_penalty(attn) + \
                    ortho_penalty(comps.reshape(comps.shape[0], -1))
        return out, self.cfg.ortho_mu * penalty

    def prompted_features(self, x, q, task):
        prefixes, penalty = self.prefixes(q, task)
        return prefixed_features(self.net.vit, x, prefixes), penalty

    # ---- training ----
    def trainable(self) -> List[nn.Parameter]:
        """The current task's rows of K, A, P, and the head."""
        prompts: CodaPrompts = self.net.prompts
        return prompts.task_parameters(prompts.num_tasks - 1) + list(self.net.head.parameters())



def check_components(components: int, tasks: int, dim: int) -> None:
    """M: a multiple of the task count (each task owns M / T), at most the width D (orthogonal keys)."""
    fit = max(tasks, min(components, dim) // tasks * tasks)
    if components < tasks or components % tasks:
        raise UserError(f"components={components} must be a multiple of the {tasks} tasks (each task owns "
                        f"components / tasks of them); use e.g. components={fit}")
    if components > dim:
        raise UserError(f"components={components} orthogonal keys do not fit the ViT width {dim}; use at most "
                        f"components={fit} (a multiple of the {tasks} tasks)")


