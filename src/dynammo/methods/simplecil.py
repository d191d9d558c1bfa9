"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024, sec. 3).

- The pretrained backbone is frozen for good and kept in eval mode; nothing is ever trained.
- After each task, the classifier weight of each new class is its prototype: the mean of the frozen
  features of the class's training images (test transform, no augmentation). Old prototypes never
  change.
- The classifier is cosine: logit_c = cos(f(x), p_c) (the paper's code keeps the cosine layer's
  scale at its initial 1, untrained, so the softmax confidence is that of raw cosines), computed in
  float64 (autocast leaves it alone: close cosines are not ranked in bf16). Prediction is the argmax
  over every seen class: one backbone pass per image at inference.
- No exemplar memory.

Without pretrained weights (`pretrained: false`) the backbone is first trained with a linear head and
cross-entropy on task 1 (`backbone_epochs`), then frozen: the project's protocol for frozen-backbone
methods (methods/frozen.py), recorded as a deviation.

A baseline for "do you need continual learning at all?": it costs one feature pass over each task's
training images.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.methods.frozen import (BACKBONE_EPOCHS, FrozenBackboneNet, check_backbone_can_train,
                                    train_backbone_then_freeze)
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.models.cosine import cosine_similarities


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, D) features and labels in [0, n_classes) -> (n_classes, D) float64 means."""
    sums = torch.zeros(n_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).double()
    return sums / counts[:, None]


class PrototypeNet(FrozenBackboneNet):
    """A frozen encoder and a cosine classifier whose weights are class prototypes."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__(backbone)
        # a classifier weight like any other (counted in params_total), never trained; float64 (see forward)
        self.prototypes = nn.Parameter(torch.zeros(0, feature_dim, dtype=torch.float64), requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def add_classes(self, n: int) -> None:
        old = self.prototypes.data
        self.prototypes = nn.Parameter(torch.cat([old, old.new_zeros(n, old.shape[1])]), requires_grad=False)

    def set_prototypes(self, start: int, prototypes: torch.Tensor) -> None:
        with torch.no_grad():
            self.prototypes[start: start + len(prototypes)] = prototypes.to(self.prototypes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 prototypes: autocast leaves float64 alone, so close cosines are never ranked in bf16
        return cosine_similarities(self.encode(x).double(), self.prototypes)


@METHODS.register("simplecil", aliases=("simple_cil",))
class SimpleCIL(Method):
    summary = ("frozen backbone, class-mean prototypes as the weights of a cosine classifier, no training "
               "(Zhou et al., IJCV 2024); one backbone pass at inference")
    options = {"backbone_epochs": BACKBONE_EPOCHS}
    paper_backbone = "an ImageNet-pretrained ViT-B/16"

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        check_backbone_can_train(cfg, num_classes)

    # ---- model ----
    def make_net(self, backbone: nn.Module) -> PrototypeNet:
        return PrototypeNet(backbone, backbone.out_dim)

    def build_network(self) -> PrototypeNet:
        backbone = build_backbone(self.cfg.backbone, self.cfg.pretrained, **backbone_kwargs(self.cfg, self.scenario))
        net = self.make_net(backbone)
        if self.cfg.pretrained:  # the paper's protocol: frozen from the start
            net.freeze_backbone()
        return net

    def begin_task(self, task: Task) -> None:
        self.net.add_classes(task.size)
        self.net.to(self.device)

    def grow(self, task: Task) -> None:
        self.begin_task(task)
        self.freeze_encoder()

    def freeze_encoder(self) -> None:
        """What a checkpoint's model has after task 1: the encoder frozen."""
        if not self.net.backbone_frozen:
            self.net.freeze_backbone()

    # ---- training: none, beside the no-weights protocol ----
    def train_task(self, task: Task) -> None:
        if not self.net.backbone_frozen:
            train_backbone_then_freeze(self, task)
        self.prepare_encoder(task)
        self.eval_mode()
        data = self.scenario.train_data(task)
        feats = self.engine.apply(self.net.encode, data)
        self.net.set_prototypes(task.start, class_means(feats, data.labels - task.start, task.size))

    def prepare_encoder(self, task: Task) -> None:
        """Before the prototypes of `task` are taken (APER adapts its second encoder on task 1)."""

    # ---- inference ----
    def predict(self, x: torch.Tensor) -> dict:
        return {"logits": self.net(x)}

    def features(self, data):
        return self.engine.apply(self.net.encode, data)
