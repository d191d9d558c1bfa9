"""What L2P, DualPrompt and CODA-Prompt share: rehearsal-free prompting of a frozen ViT.

- The ViT (a `vit_*` backbone) is frozen; only the method's prompt module (prompts, keys, CODA's
  attention vectors) and the linear head train. Without pretrained weights the backbone is first
  trained on task 1 and then frozen (methods/frozen.py), recorded as a deviation.
- Every image goes through the ViT twice, at training and at test: the query pass (no prompts, no
  gradient, `models/prompting.query_features`) and the prompted pass. Both are counted in `cost`.
- Training masks the logits of every class outside the current task (-inf before the
  cross-entropy), so old head rows get no gradient; evaluation takes the argmax over every seen class
  (the head has exactly the seen classes' rows).
- The optimiser is re-created every task (Engine.fit does), so Adam's moments never move an
  unselected prompt or an old row. Optional gradient-norm clipping (`prompt_grad_clip`).

A subclass builds its prompt module (`build_prompts`), may prepare it at a task's start
(`start_task`), and computes the head's input (`prompted_features(x, q, task)`, task = the current
task while training, None at test) with its extra loss term.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods.base import Method
from dynammo.methods.frozen import (BACKBONE_EPOCHS, FrozenBackboneNet, check_backbone_can_train,
                                    train_backbone_then_freeze)
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.models.backbones.vit import is_vit
from dynammo.models.heads import IncrementalLinear
from dynammo.models.prompting import query_features
from dynammo.optim import OptimSettings

PROMPT_OPTIONS: Dict[str, Option] = {
    "backbone_epochs": BACKBONE_EPOCHS,
    "prompt_grad_clip": Option("float", None, "clip the gradient norm of the prompts and head to this value "
                                              "(L2P and DualPrompt's official recipes: 1.0; unset: no clipping)",
                               min=0.0, min_open=True),
    "coda_schedule": Option("str", "config", "learning-rate schedule of the prompt training: coda_cos "
                                             "(lrate cos(99 pi e / (200 (E-1))) per epoch, CODA-Prompt's, which its "
                                             "re-implementations of L2P and DualPrompt also use) | config (the "
                                             "framework's `scheduler` key)", choices=("coda_cos", "config")),
}


def coda_cosine_factor(epoch: int, epochs: int) -> float:
    """CODA-Prompt's schedule (utils/schedulers.py): cos(99 pi e / (200 (E - 1))) (E = 1: 1)."""
    return math.cos(99 * math.pi * epoch / (200 * max(epochs - 1, 1)))


@dataclasses.dataclass
class CodaCosine(OptimSettings):
    """OptimSettings with CODA's per-epoch cosine schedule instead of the configured one."""

    def schedule(self, opt):
        epochs = self.epochs
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: coda_cosine_factor(e, epochs))


class PromptNet(FrozenBackboneNet):
    """A frozen ViT backbone, a prompt module and one linear head over the seen classes."""

    def __init__(self, backbone, prompts: nn.Module):
        super().__init__(backbone)
        self.prompts = prompts
        self.head = IncrementalLinear(backbone.out_dim)

    @property
    def vit(self) -> nn.Module:
        return self.backbone.vit


def mask_outside_task(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """-inf for every class outside [start, end): the cross-entropy sees the current task only."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[start:end] = True
    return logits.masked_fill(~keep, float("-inf"))


class PromptMethod(Method):
    options = PROMPT_OPTIONS
    current_task: Optional[Task] = None  # the task being trained (set by train_task)
    paper_backbone = "an ImageNet-pretrained ViT-B/16"

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        check_backbone_can_train(cfg, num_classes)
        if not is_vit(cfg.backbone):
            raise UserError(f"method '{cfg.method}' prompts a Vision Transformer, but backbone={cfg.backbone} is not "
                            "one; use backbone=vit_base_patch16_224 (the paper's), vit_small_patch16_224, "
                            "vit_tiny_patch16_224 or vit_cpu")

    # ---- model ----
    def build_prompts(self, vit: nn.Module) -> nn.Module:
        raise NotImplementedError

    def build_network(self) -> PromptNet:
        backbone = build_backbone(self.cfg.backbone, self.cfg.pretrained, **backbone_kwargs(self.cfg, self.scenario))
        net = PromptNet(backbone, self.build_prompts(backbone.vit))
        if self.cfg.pretrained:  # the papers' protocol: frozen from the start
            net.freeze_backbone()
        return net

    def start_task(self, task: Task) -> None:
        """Prepare the prompt module for `task` (DualPrompt copies the last E-prompt, CODA adds components)."""

    def begin_task(self, task: Task) -> None:
        super().begin_task(task)
        self.start_task(task)
        self.net.to(self.device)

    def grow(self, task: Task) -> None:
        self.begin_task(task)
        if not self.net.backbone_frozen:
            self.net.freeze_backbone()

    # ---- training ----
    def prompted_features(self, x: torch.Tensor, q: torch.Tensor,
                          task: Optional[Task]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(head input (B, D), extra loss term (a scalar; 0 at test))."""
        raise NotImplementedError

    def trainable(self) -> List[nn.Parameter]:
        return list(self.net.prompts.parameters()) + list(self.net.head.parameters())

    def train_task(self, task: Task) -> None:
        if not self.net.backbone_frozen:
            train_backbone_then_freeze(self, task)
        self.net.train()
        self.current_task = task
        params = self.trainable()
        clip = self.cfg.prompt_grad_clip
        before_step = (lambda: torch.nn.utils.clip_grad_norm_(params, clip)) if clip else None
        self.engine.fit(params, self.scenario.train_data(task), self.step, self.optim_settings(task),
                        stage="prompts", before_step=before_step)

    def optim_settings(self, task: Task) -> OptimSettings:
        """How the prompts and the head train in `task`: CODA-Prompt's schedule where coda_schedule says so."""
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        return settings if self.cfg.coda_schedule == "config" else CodaCosine(**vars(settings))

    def step(self, batch: Batch):
        task = self.current_task
        q = query_features(self.net.vit, batch.x)
        feats, extra = self.prompted_features(batch.x, q, task)
        logits = mask_outside_task(self.net.head(feats), task.start, task.end)
        return F.cross_entropy(logits, batch.y) + extra, logits, batch.y

    # ---- inference ----
    def predict(self, x: torch.Tensor) -> dict:
        q = query_features(self.net.vit, x)
        feats, _ = self.prompted_features(x, q, None)
        return {"logits": self.net.head(feats)}

    def features(self, data):
        return self.engine.apply(lambda x: query_features(self.net.vit, x), data)

