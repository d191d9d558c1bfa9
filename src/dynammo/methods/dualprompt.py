"""DualPrompt: complementary G- and E-prompts prefixed to a frozen ViT (Wang et al., "DualPrompt:
Complementary Prompting for Rehearsal-free Continual Learning", ECCV 2022).

Model (the paper, Sec. 4; the official JAX code google-research/l2p and its port JH-LEE-KR/dualprompt-pytorch
"DP-pt"; formulas restated, no code copied):
- G-prompt at blocks `g_prompt_layers` = [0, 1]: per block a key part and a value part of `g_prompt_length`
  = 5 vectors each, shared by every task and trained in every task.
- E-prompt pool at blocks `e_prompt_layers` = [2, 3, 4]: M = number of tasks entries, each a key part
  and a value part of `e_prompt_length` vectors per block (5 for CIFAR-100, 20 for ImageNet-R), and ONE
  key k_m in R^D per entry, shared by the E-layers.
- Prefix-tuning: at a listed block, with h = LN1(x), Q = h W_q, K = [P_K; h W_k], V = [P_V; h W_v]: the
  prefixes are raw keys/values concatenated after the projection (models/prompting.run_blocks); the
  sequence length is unchanged.
- The query q(x) is the CLS token of the same frozen ViT run without prompts (no gradient); the head is one
  linear layer on the prompted pass's CLS token after the final norm. 2 ViT passes per image.
- Training task t: the E-prompt used is entry t (the task id, top-1, DP-pt's `use_prompt_mask`), whatever
  the keys say; loss = CE(logits masked to task t's classes) - lambda * (1/B) sum_b cos(q_b, k_t),
  lambda = `pull_weight` = 1.0. Only G, e_t, k_t and the head are given to the optimiser (re-created
  every task), so the other entries and keys never move.
- Test: per sample, m_b = argmax_m cos(q_b, k_m) over the keys of the tasks learned so far (the keys of
  future tasks never compete); sample b gets E-prompt m_b. Nothing depends on the other images of the
  batch. `predict` also returns the chosen entry as "task_id", so results.json records how often the
  key match finds the sample's own task (`task_id_acc`).
- Start of task t > 0: e_t := e_{t-1} (every E-layer, key and value parts; `shared_prompt_pool=True`);
  the keys are not copied (`shared_prompt_key=False`). The copy is data-free (it is what `grow` replays
  before a checkpoint's weights are loaded over it).
- Init (the paper does not say): U(-1, 1) for the G-prompt, the E-prompts and the keys, as DP-pt, by
  default; `prompt_init=jax` gives the JAX code's flax uniform(), U[0, 0.01). The head is PyTorch's
  default Linear init (JAX: zeros).

Where the official code differs from the paper, and what runs here:
- DP-pt's CIFAR config votes one E-prompt per test batch (`batchwise_prompt=True`): the test loaders are
  per task, so the vote leaks the task identity. Selection here is always per sample (the paper's rule;
  the official ImageNet-R config also has it off).
- DP-pt reshapes its (layers, 2, B, ...) prefix tensor instead of permuting it, so with per-sample
  selection sample b gets its batch-mates' key prefixes as K and V; here every sample's K prefix feeds
  keys and its V prefix values (tests/test_dualprompt.py checks batch independence and the K/V order).
- JAX/DP-pt take the test argmax over all classes' logits (untrained future rows compete); here over the
  classes seen so far (CODA-Prompt's, Mammoth's and PILOT's protocol).
- Gradient-norm clipping 1.0 (`prompt_grad_clip`, the official configs' grad_norm_clip) is on by default;
  CODA-Prompt's re-implementation of DualPrompt (its shared protocol) does not clip.
- The official recipe has Adam without weight decay; set `weight_decay=0` (the framework's default is
  5e-4, which would shrink old head rows).
Without pretrained weights the ViT is first trained on task 1 and then frozen (a recorded deviation).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.prompt_base import PROMPT_OPTIONS, PromptMethod
from dynammo.models.prompting import prefixed_features, query_features

INIT_RANGES = {"uniform": (-1.0, 1.0), "jax": (0.0, 0.01)}  # U(low, high) of prompts and keys
PAPER_E_LENGTH = {"imagenet_r": 20}  # the paper's E-prompt length by dataset; 5 (CIFAR-100) otherwise
DEFAULT_E_LENGTH = 5

DUALPROMPT_OPTIONS: Dict[str, Option] = {
    **PROMPT_OPTIONS,
    "prompt_grad_clip": Option("float", 1.0, "clip the gradient norm of the prompts, keys and head to this value "
                                             "(null: no clipping)", min=0.0, min_open=True, nullable=True,
                               faithful=1.0),
    "g_prompt_layers": Option("int_list", [0, 1], "blocks that get the G-prompt (shared by every task)",
                              min=0, unique=True, faithful=[0, 1]),
    "e_prompt_layers": Option("int_list", [2, 3, 4], "blocks that get the E-prompt (one pool entry per task)",
                              min=0, unique=True, faithful=[2, 3, 4]),
    "g_prompt_length": Option("int", 5, "G-prompt vectors per block, for the keys and again for the values "
                                        "(0: no G-prompt)", min=0, faithful=5),
    "e_prompt_length": Option("int", DEFAULT_E_LENGTH, "E-prompt vectors per block, for the keys and again for the "
                                                       "values (paper: 5 on CIFAR-100, 20 on ImageNet-R)",
                              min=0, faithful=DEFAULT_E_LENGTH),
    "pull_weight": Option("float", 1.0, "lambda of the key-query matching loss -lambda * mean_b cos(q_b, k_t)",
                          min=0.0, faithful=1.0),
    "prompt_init": Option("str", "uniform", "init of the G-/E-prompts and keys: uniform = U(-1, 1) (dualprompt-pytorch) "
                                            "| jax = U[0, 0.01) (the official JAX code's flax uniform())",
                          choices=("uniform", "jax")),
    "shared_prompt_pool": Option("bool", True, "start task t's E-prompt as a copy of task t-1's (the official "
                                               "code's shared_prompt_pool)", faithful=True),
}


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last axis, as the official code: x * rsqrt(max(sum x^2, 1e-12))."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=1e-12))


def paper_e_length(cfg) -> int:
    """The paper's E-prompt length for the run's dataset (20 on ImageNet-R, 5 on CIFAR-100 and else)."""
    from dynammo.data.datasets import DATASETS

    ds = cfg.get("dataset")
    if isinstance(ds, str):
        try:
            return PAPER_E_LENGTH.get(DATASETS.canonical(ds), DEFAULT_E_LENGTH)
        except UserError:
            pass
    return DEFAULT_E_LENGTH


def check_layers(g_layers: List[int], e_layers: List[int], depth: int, backbone: str) -> None:
    """One line when a prompt block does not exist in the ViT or gets both prompts."""
    used = list(g_layers) + list(e_layers)
    if used and max(used) >= depth:
        need = max(used) + 1
        raise UserError(f"method 'dualprompt' puts its G-prompt at blocks {list(g_layers)} and its E-prompt at blocks "
                        f"{list(e_layers)}, but backbone {backbone} has {depth} blocks; use a ViT with at least {need} "
                        f"(e.g. vit_depth={need} for vit_cpu) or set g_prompt_layers/e_prompt_layers to blocks "
                        f"below {depth}")
    both = sorted(set(g_layers) & set(e_layers))
    if both:
        raise UserError(f"method 'dualprompt': blocks {both} are in both g_prompt_layers and e_prompt_layers; give "
                        "each block one of the two prompts")


class DualPromptModule(nn.Module):
    """The G-prompt (n_G, 2, Lg, D), the E-prompt pool (M entries of (n_E, 2, Le, D)) and its keys (M of (D,)).
    Index 0 of the "2" axis is the key prefix, 1 the value prefix."""

    def __init__(self, dim: int, pool_size: int, g_layers: List[int], e_layers: List[int], g_length: int,
                 e_length: int, init: str = "uniform"):
        super().__init__()
        low, high = INIT_RANGES[init]

        def param(*shape):
            return nn.Parameter(torch.empty(*shape).uniform_(low, high))

        self.g_layers, self.e_layers = [int(i) for i in g_layers], [int(i) for i in e_layers]
        self.g_prompt = param(len(self.g_layers), 2, g_length, dim)
        self.e_prompts = nn.ParameterList([param(len(self.e_layers), 2, e_length, dim) for _ in range(pool_size)])
        self.e_keys = nn.ParameterList([param(dim) for _ in range(pool_size)])

    @property
    def pool_size(self) -> int:
        return len(self.e_prompts)

    def similarity(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """cos(q_b, k_m) for the first n keys: (B, n)."""
        keys = torch.stack([self.e_keys[m] for m in range(n)])
        return l2_normalize(q) @ l2_normalize(keys).t()

    def select(self, q: torch.Tensor, n: int) -> torch.Tensor:
        """Each sample's E-prompt at test: argmax over the first n keys of cos(q_b, k_m), (B,)."""
        return self.similarity(q, n).argmax(dim=1)

    def prefixes(self, e: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """{block: (key prefix, value prefix)} for E-prompts e of shape (B or 1, n_E, 2, Le, D)."""
        out = {layer: (self.g_prompt[i, 0].unsqueeze(0), self.g_prompt[i, 1].unsqueeze(0))
               for i, layer in enumerate(self.g_layers)}
        out.update({layer: (e[:, j, 0], e[:, j, 1]) for j, layer in enumerate(self.e_layers)})
        return out

    def copy_entry(self, src: int, dst: int) -> None:
        with torch.no_grad():
            self.e_prompts[dst].copy_(self.e_prompts[src])


@METHODS.register("dualprompt", aliases=("dual_prompt",))
class DualPrompt(PromptMethod):
    summary = ("frozen ViT + shared G-prefixes (blocks 0-1) and one E-prefix per task (blocks 2-4) chosen by "
               "key-query cosine at test, rehearsal-free (ECCV 2022)")
    options = DUALPROMPT_OPTIONS
    paper_backbone = "an ImageNet-21k-pretrained ViT-B/16"

    # ---- configuration ----
    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        from dynammo.models.backbones import backbone_kwargs, build_backbone

        # the block count without building weights: on the meta device, the seeded RNG left as it was
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            depth = len(build_backbone(cfg.backbone, False, **backbone_kwargs(cfg)).vit.blocks)
        check_layers(cfg.g_prompt_layers, cfg.e_prompt_layers, depth, cfg.backbone)

    @classmethod
    def variant_options(cls, cfg) -> Dict[str, object]:
        out = super().variant_options(cfg)
        out.pop("e_prompt_length", None)
        if cfg.get("e_prompt_length") != paper_e_length(cfg):
            out["e_prompt_length"] = cfg.get("e_prompt_length")
        return out

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        paper = paper_e_length(cfg)
        out = []
        for line in super().deviations(cfg):  # the option lines say the CIFAR value; give the dataset's
            if line.startswith("e_prompt_length="):
                line = (f"e_prompt_length={cfg.e_prompt_length} instead of the paper's {paper} for this dataset: "
                        f"{cls.options['e_prompt_length'].help}")
            out.append(line)
        return out

    # ---- model ----
    def build_prompts(self, vit: nn.Module) -> nn.Module:
        cfg = self.cfg
        check_layers(cfg.g_prompt_layers, cfg.e_prompt_layers, len(vit.blocks), cfg.backbone)
        return DualPromptModule(int(vit.embed_dim), len(self.scenario.tasks), cfg.g_prompt_layers,
                                cfg.e_prompt_layers, cfg.g_prompt_length, cfg.e_prompt_length, cfg.prompt_init)

    def start_task(self, task: Task) -> None:
        """Data-free: e_t := e_{t-1} (grow replays it; a checkpoint's weights are loaded over it)."""
        if task.id > 0 and self.cfg.shared_prompt_pool:
            self.net.prompts.copy_entry(task.id - 1, task.id)

    def trainable(self) -> List[nn.Parameter]:
        """G, the current task's E-prompt and key, and the head: nothing else reaches the optimiser."""
        prompts, t = self.net.prompts, self.current_task.id
        return [prompts.g_prompt, prompts.e_prompts[t], prompts.e_keys[t], *self.net.head.parameters()]

    # ---- the prompted pass ----
    def with_entries(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The head input of x with E-prompt entry idx[b] for sample b."""
        prompts = self.net.prompts
        e = torch.stack([prompts.e_prompts[m] for m in range(self.tasks_done)])[idx]
        return prefixed_features(self.net.vit, x, prompts.prefixes(e))

    def prompted_features(self, x: torch.Tensor, q: torch.Tensor,
                          task: Optional[Task]) -> Tuple[torch.Tensor, torch.Tensor]:
        prompts = self.net.prompts
        if task is None:  # test: each sample's best-matching key among the tasks learned so far
            return self.with_entries(x, prompts.select(q, self.tasks_done)), q.new_zeros(())
        e = prompts.e_prompts[task.id].unsqueeze(0)  # training: entry t (the task id), shared by the batch
        cos = (l2_normalize(q) * l2_normalize(prompts.e_keys[task.id])).sum(dim=1)
        return prefixed_features(self.net.vit, x, prompts.prefixes(e)), -self.cfg.pull_weight * cos.mean()

    def predict(self, x: torch.Tensor) -> dict:
        """The logits over the seen classes, and the task whose E-prompt each sample used ("task_id": the
        runner reports how often the key match finds the sample's true task)."""
        q = query_features(self.net.vit, x)
        idx = self.net.prompts.select(q, self.tasks_done)
        logits = self.net.head(self.with_entries(x, idx))
        return {"logits": logits, "task_id": idx, "task_il_logits": torch.softmax(logits.float(), dim=1)}
