"""UCIR / LUCIR: a unified classifier learned incrementally via rebalancing (Hou, Pan, Loy, Wang and
Lin, "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019).

- Cosine normalisation: logits = sigma * cos(theta_c, f(x)) with one learnable scale sigma (init 1,
  `models/cosine.py`); the backbone's last ReLU is removed so the feature can be negative, as in
  the authors' ResNets (`last_relu=false`, `Backbone.remove_last_relu`).
- Old and new class weights are separate blocks. From task 1 on, the new block is imprinted with
  the L2-normalised mean of each new class's normalised features (times the mean norm of the old
  weights), and the old block is frozen while the task trains (`freeze_old_weights`), as in the
  authors' code.
- Less-forget constraint: L_dis = 1 - cos(f_new(x), f_old(x)) on every training sample, with the
  previous task's frozen backbone as f_old, weighted by lambda = lambda_base * sqrt(n_old / n_new)
  (lambda_base = 5 on CIFAR-100).
- Inter-class separation: for every memory sample (an old class), the margin ranking loss
  max(0, m - <theta_y, f> + <theta_k, f>) against its K hardest new classes (the K highest new-class
  cosines), K = 2, m = 0.5, weight 1, on unscaled cosines. Averaged over the (sample, negative)
  pairs as in the authors' code; the paper's Eq. 8 sums over the K negatives instead, which is
  `mr_weight = K` here.
- Loss: CE(sigma * cos, y) + lambda * L_dis + mr_weight * L_mr on the task's data plus the memory.
The class-balanced fine-tuning the paper uses on ImageNet only is not part of this method.

The less-forget constraint assumes a base task rich enough to give every later class a usable
feature (the paper starts from 50 CIFAR classes). After a 2-class base task learned from scratch it
keeps the features too still for the next classes: see docs/results_mednist.md.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.methods.distill import frozen_copy
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.models.cosine import CosineNet, imprinted_weights


def less_forget_weight(lambda_base: float, n_old: int, n_new: int) -> float:
    """lambda = lambda_base * sqrt(n_old / n_new) (the paper's adaptive weight)."""
    return lambda_base * math.sqrt(n_old / n_new)


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(f_new, f_old); the old features get no gradient."""
    return (1.0 - F.cosine_similarity(features, old_features.detach(), dim=1)).mean()


def margin_ranking_loss(cosines: torch.Tensor, y: torch.Tensor, n_old: int, k: int, margin: float) -> torch.Tensor:
    """Mean over old-class samples and their k hardest new classes of max(0, margin - cos_y + cos_neg).

    cosines: (B, n_seen) unscaled class cosines; classes >= n_old are the new ones (k is capped at
    their number). Zero when the batch holds no old-class sample."""
    old = y < n_old
    if not old.any() or cosines.shape[1] <= n_old:
        return cosines.new_zeros(())
    target = cosines[old].gather(1, y[old].unsqueeze(1))  # (N_old, 1)
    hardest = cosines[old, n_old:].topk(min(k, cosines.shape[1] - n_old), dim=1).values  # (N_old, k)
    return F.relu(margin - target + hardest).mean()


def build_cosine_net(cfg, proxies: int = 1, scenario=None) -> CosineNet:
    backbone = build_backbone(cfg.backbone, cfg.pretrained, **backbone_kwargs(cfg, scenario))
    if not cfg.last_relu:
        backbone.remove_last_relu()
    return CosineNet(backbone, proxies)


class CosineRehearsal(Method):
    """What UCIR and PODNet share: a cosine classifier that grows one weight block per task (old
    blocks frozen when `freeze_old_weights`), trained on the task's data plus the memory, with the
    backbone of the previous task as the distillation teacher."""

    uses_memory = True
    old_backbone: Optional[nn.Module] = None

    # ---- structure ----
    def begin_task(self, task: Task) -> None:
        """Structure only (also replayed by `load_state_dict`): a new weight block, old ones frozen."""
        self.net.head.expand(task.size)
        if task.id > 0 and self.cfg.freeze_old_weights:
            self.net.head.freeze_old()
        self.net.to(self.device)

    def training_set(self, task: Task) -> ImageSet:
        return ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()])


@METHODS.register("ucir", aliases=("lucir", "ucir_il", "lucir_il"))
class UCIR(CosineRehearsal):
    summary = "cosine classifier + less-forget feature distillation + margin ranking on hard negatives (CVPR 2019)"
    options = {
        "lambda_base": Option("float", 5.0, "less-forget weight base: lambda = lambda_base * sqrt(n_old / n_new) "
                                            "(5 on CIFAR-100 in the paper)", min=0.0),
        "mr_k": Option("int", 2, "margin ranking loss: hard negative (new) classes per memory sample", min=1),
        "mr_margin": Option("float", 0.5, "margin ranking loss: margin m on cosines", min=0.0, max=2.0),
        "mr_weight": Option("float", 1.0, "weight of the margin ranking loss", min=0.0),
        "last_relu": Option("bool", False, "keep the ReLU at the end of the backbone (the paper removes it)"),
        "imprint": Option("bool", True, "initialise new class weights from their normalised feature means"),
        "freeze_old_weights": Option("bool", True, "old class weights stay fixed while a new task trains "
                                                   "(the authors' code)"),
    }

    @classmethod
    def backbone_needs(cls, cfg) -> tuple:
        if cfg.last_relu:
            return "", ""
        return "a ReLU at the end of the backbone to drop (last_relu=false)", " or set last_relu=true"

    def build_network(self) -> CosineNet:
        return build_cosine_net(self.cfg, scenario=self.scenario)

    # ---- training ----
    def train_task(self, task: Task) -> None:
        # The teacher: the backbone as it ended task t-1 (begin_task changed only the head).
        self.old_backbone = frozen_copy(self.net.backbone) if task.id > 0 else None
        if task.id > 0 and self.cfg.imprint:
            self.imprint(task)
        super().train_task(task)

    def imprint(self, task: Task) -> None:
        """New block <- normalised mean feature of each new class, scaled to the old weights' mean norm."""
        self.eval_mode()
        data = self.scenario.train_data(task)
        feats = [self.engine.apply(self.net.features, data.of_classes([c])) for c in task.classes]
        old = torch.cat(list(self.net.head.blocks[:-1]))
        w = imprinted_weights(feats, proxies=1, norm=old.norm(dim=1).mean().item())
        with torch.no_grad():
            self.net.head.blocks[-1].copy_(w.to(old.device))

    def step(self, batch: Batch):
        features = self.net.backbone(batch.x)
        cosines = self.net.head.similarities(features)
        logits = self.net.head.scale * cosines
        loss = F.cross_entropy(logits, batch.y)
        if self.old_backbone is not None:
            with torch.no_grad():
                old_features = self.old_backbone(batch.x)
            lam = less_forget_weight(self.cfg.lambda_base, self.known, self.total - self.known)
            loss = loss + lam * less_forget_loss(features, old_features)
            ranking = margin_ranking_loss(cosines, batch.y, self.known, self.cfg.mr_k, self.cfg.mr_margin)
            ranking = batch.subset_mean(ranking, int((batch.y < self.known).sum()),
                                        int((batch.batch_labels < self.known).sum()))
            loss = loss + self.cfg.mr_weight * ranking
        return loss, logits, batch.y

    def end_task(self, task: Task) -> None:
        self.old_backbone = None  # only needed while training; rebuilt from the net at the next task
        super().end_task(task)
