"""PODNet: pooled outputs distillation (Douillard, Cord, Ollion, Robert and Valle, "PODNet: Pooled
Outputs Distillation for Small-Tasks Incremental Learning", ECCV 2020).

- Local similarity classifier (LSC, Eq. 6, `models/cosine.py`): K proxies per class (K = 10),
  class similarity y_c = sum_k softmax_k(<theta_ck, h>) <theta_ck, h> on normalised vectors. The
  backbone's last ReLU is removed (`last_relu=false`): the authors' network feeds the classifier
  and POD-flat the pre-activation embedding.
- NCA loss with margin (Eq. 7): [-log( exp(eta (y_y - delta)) / sum_{c != y} exp(eta y_c) )]_+ with
  delta = 0.6 and a learned scale eta (init 1), `nca_variant`: `paper` (the default) is Eq. 7 with its
  full gradient; `stable` is its value with the gradient to eta skipping the constant margin term
  (with the paper's gradient eta can collapse through zero on two-class tasks, see `nca_loss`); `code`
  is the released code's `nca` (the margin subtracted from every similarity, so it cancels; the
  target's entry of the denominator set to 0 after the max shift, i.e. one exp(0) term; no hinge).
- POD-spatial (Eqs. 2-4) on the output of every residual stage: each map is squared (as in the
  authors' code), sum-pooled over the width and over the height, the two concatenated and
  L2-normalised per sample; the loss is the L2 distance between old and new model, averaged over the
  batch and over stages. POD-flat on the final embedding: 1 - cos(h_old, h_new) as in the authors'
  code (the paper writes an L2 distance). Weights lambda_spatial = 3, lambda_flat = 1 (CIFAR-100),
  both times sqrt(n_seen / n_new).
- From task 1 on, the new classes' proxies are imprinted with k-means centres of their normalised
  features, and the old classes' proxies are frozen while the task trains (as the authors' CIFAR
  setting); gradients are clamped to [-5, 5] element-wise as in their code.
- After each task t >= 1: class-balanced fine-tuning of the classifier (all proxies; features,
  BatchNorm and scale fixed) with the NCA loss on a balanced set (the memory's m exemplars of each
  old class + m herding-chosen images of each new class, m = memory_size // n_seen): 20 epochs,
  SGD lr 0.05 on CIFAR-100.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.memory import balanced_set
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.distill import frozen_copy
from dynammo.methods.ucir import CosineRehearsal, build_cosine_net
from dynammo.models.cosine import CosineNet, imprinted_weights
from dynammo.optim import OptimSettings, stage_options


NCA_VARIANTS = ("paper", "stable", "code")


def nca_loss(similarities: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, margin: float,
             variant: str = "paper") -> torch.Tensor:
    """Mean over the batch of [ -eta (s_y - margin) + log sum_{c != y} exp(eta s_c) ]_+ (PODNet Eq. 7).

    paper: Eq. 7 and its full gradient. stable: the same value, but the gradient reaching the learned
    scale eta skips the constant -eta * margin term: with it, eta shrinks whenever the margin is not
    met yet, which is always the case early on, and on two-class tasks it can cross zero and the
    classifier inverts (seen on digits: eta -> -5, 13 % accuracy); without it eta learns as a plain
    NCA temperature. code: the released code's loss, -z_y + log(1 + sum_{c != y} exp(z_c)) with
    z = eta (s - margin) - max_c eta (s_c - margin): the margin cancels, the target's slot of the
    denominator holds exp(0), no hinge."""
    if similarities.shape[1] < 2:  # one class seen: nothing to separate it from
        return similarities.sum() * 0.0
    z = scale * similarities.float()
    onehot = F.one_hot(y, z.shape[1]).bool()
    if variant == "code":
        z = z - scale * margin
        z = z - z.max(dim=1, keepdim=True).values
        target = z.gather(1, y.unsqueeze(1)).squeeze(1)
        denominator = torch.logsumexp(z.masked_fill(onehot, 0.0), dim=1)
        return (denominator - target).mean()
    shift = (scale.detach() if variant == "stable" else scale) * margin
    target = z.gather(1, y.unsqueeze(1)).squeeze(1) - shift
    others = z.masked_fill(onehot, float("-inf"))
    return F.relu(torch.logsumexp(others, dim=1) - target).mean()


def pod_pool(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*H + C*W): the squared map sum-pooled over the width and over the height,
    concatenated and L2-normalised per sample."""
    h = h.float().pow(2)
    return F.normalize(torch.cat([h.sum(dim=3).flatten(1), h.sum(dim=2).flatten(1)], dim=1), dim=1)


def pod_spatial_loss(old_stages: List[torch.Tensor], new_stages: List[torch.Tensor]) -> torch.Tensor:
    """Mean over stages of the batch-mean L2 distance between pooled old and new stage outputs."""
    per_stage = [(pod_pool(o.detach()) - pod_pool(n)).norm(dim=1).mean() for o, n in zip(old_stages, new_stages)]
    return torch.stack(per_stage).mean()


def pod_flat_loss(old_features: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(features.float(), old_features.detach().float(), dim=1)).mean()


def pod_factor(n_seen: int, n_new: int) -> float:
    """sqrt(n_seen / n_new), the scaling of both POD terms."""
    return math.sqrt(n_seen / n_new)


@METHODS.register("podnet", aliases=("podnet_il",))
class PODNet(CosineRehearsal):
    summary = "local similarity classifier + pooled outputs distillation + NCA, balanced fine-tuning (ECCV 2020)"
    options = {
        "proxies": Option("int", 10, "proxies per class of the local similarity classifier", min=1, max=100),
        "lambda_spatial": Option("float", 3.0, "POD-spatial weight (times sqrt(n_seen / n_new)); 3 on CIFAR-100",
                                 min=0.0),
        "lambda_flat": Option("float", 1.0, "POD-flat weight (times sqrt(n_seen / n_new))", min=0.0),
        "nca_margin": Option("float", 0.6, "NCA loss margin delta", min=0.0),
        "nca_variant": Option("str", "paper", "NCA loss: paper (Eq. 7, full gradient) | stable (Eq. 7's value, the "
                                              "gradient to the scale eta without the margin term, so eta cannot "
                                              "collapse through zero on small tasks) | code (the released code: the "
                                              "margin cancels, no hinge)", choices=NCA_VARIANTS, faithful="paper"),
        "last_relu": Option("bool", False, "keep the ReLU at the end of the backbone (the authors' network has none)"),
        "proxy_init": Option("str", "kmeans", "new proxies of tasks t >= 1: kmeans (imprinted from k-means of the "
                                              "class's normalised features) | random", choices=("kmeans", "random")),
        "freeze_old_weights": Option("bool", True, "old class proxies stay fixed while a new task trains"),
        "grad_clamp": Option("float", 5.0, "clamp every gradient element to [-v, v] (0: off)", min=0.0),
        "finetune": Option("bool", True, "class-balanced fine-tuning of the classifier after each task t >= 1"),
        **stage_options("_finetune", "balanced fine-tuning",
                        defaults=dict(epochs=20, lrate=0.05, opt_type="sgd", scheduler="none", milestones=[]),
                        notes=dict(scheduler="the authors': constant")),
    }

    @classmethod
    def backbone_needs(cls, cfg) -> tuple:
        return "the outputs of the backbone's residual stages (POD-spatial distillation)", ""

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        return super().deviations(cfg) + [
            "POD-flat is 1 - cos(h_old, h_new) as the authors' code (the paper writes an L2 distance)",
        ]

    def build_network(self) -> CosineNet:
        return build_cosine_net(self.cfg, proxies=self.cfg.proxies, scenario=self.scenario)

    # ---- training ----
    def train_task(self, task: Task) -> None:
        # The teacher: the backbone as it ended task t-1 (begin_task changed only the head).
        self.old_backbone = frozen_copy(self.net.backbone) if task.id > 0 else None
        if task.id > 0 and self.cfg.proxy_init == "kmeans":
            self.imprint(task)
        self.train_mode()
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        self.engine.fit(self.net.parameters(), self.training_set(task), self.step, settings,
                        before_step=self.clamp_gradients)
        if task.id > 0 and self.cfg.finetune:
            self.balanced_finetune(task)

    def imprint(self, task: Task) -> None:
        """New proxies <- k-means centres of each new class's normalised features (old weights' mean norm)."""
        self.eval_mode()
        data = self.scenario.train_data(task)
        feats = [self.engine.apply(self.net.features, data.of_classes([c])) for c in task.classes]
        old = torch.cat(list(self.net.head.blocks[:-1]))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.engine.generator))
        w = imprinted_weights(feats, self.cfg.proxies, norm=old.norm(dim=1).mean().item(), seed=seed)
        with torch.no_grad():
            self.net.head.blocks[-1].copy_(w.to(old.device))

    def clamp_gradients(self) -> None:
        if self.cfg.grad_clamp > 0:
            for p in self.net.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-self.cfg.grad_clamp, self.cfg.grad_clamp)

    def distillation(self, x: torch.Tensor, features: torch.Tensor, stages: List[torch.Tensor]) -> torch.Tensor:
        """lambda_spatial * POD-spatial + lambda_flat * POD-flat against the old backbone, both scaled."""
        with torch.no_grad():
            old_features, old_stages = self.old_backbone(x, return_stages=True)
        factor = pod_factor(self.total, self.total - self.known)
        return factor * (self.cfg.lambda_spatial * pod_spatial_loss(old_stages, stages)
                         + self.cfg.lambda_flat * pod_flat_loss(old_features, features))

    def step(self, batch: Batch):
        features, stages = self.net.backbone(batch.x, return_stages=True)
        sims = self.net.head.similarities(features)
        loss = nca_loss(sims, batch.y, self.net.head.scale, self.cfg.nca_margin, self.cfg.nca_variant)
        if self.old_backbone is not None:
            loss = loss + self.distillation(batch.x, features, stages)
        return loss, sims, batch.y

    def balanced_finetune(self, task: Task) -> None:
        """The classifier's proxies on a class-balanced set; backbone, BatchNorm and scale fixed."""
        self.eval_mode()
        m = self.memory.quota(task.end)
        data = balanced_set(self.memory, self.scenario.train_data(task), task.classes, m, self.features,
                            self.engine.generator)
        head = self.net.head
        for block in head.blocks:
            block.requires_grad_(True)

        def loss(batch: Batch):
            with torch.no_grad():
                features = self.net.backbone(batch.x)
            sims = head.similarities(features)
            loss = nca_loss(sims, batch.y, head.scale.detach(), self.cfg.nca_margin, self.cfg.nca_variant)
            return loss, sims, batch.y

        self.engine.fit(list(head.blocks), data, loss, OptimSettings.from_config(self.cfg, "_finetune"),
                        stage="balanced", before_step=self.clamp_gradients)

    def end_task(self, task: Task) -> None:
        self.old_backbone = None  # only needed while training; rebuilt from the net at the next task
        super().end_task(task)
