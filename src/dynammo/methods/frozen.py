"""What the frozen-backbone methods share (ACL, DynaMMo, L2P, DualPrompt, CODA-Prompt): a network
whose backbone is frozen for good once `freeze_backbone` is called, and the documented protocol for
runs without pretrained weights: the backbone is first trained with a plain linear head and
cross-entropy on task 1's data, then frozen (the papers freeze ImageNet-pretrained weights; set
`pretrained: PATH` for that).
"""
from __future__ import annotations

import itertools

import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.scenario import Task, task_sizes
from dynammo.errors import UserError
from dynammo.optim import OptimSettings

BACKBONE_EPOCHS = Option("int", None, "pretrained=false only: epochs of plain training of the backbone on "
                                      "task 0 before it is frozen (default: epochs; 0 keeps it random)", min=0)


class FrozenBackboneNet(nn.Module):
    """A backbone, trainable until `freeze_backbone`, then frozen and kept in eval mode."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # its BatchNorm statistics never change
        return self


def backbone_epochs(cfg) -> int:
    return cfg.epochs if cfg.backbone_epochs is None else cfg.backbone_epochs


def no_weights_deviation(cfg, paper_backbone: str) -> str:
    return (f"backbone trained on task 1's data for {backbone_epochs(cfg)} epochs, then frozen: no pretrained "
            f"weights (the paper freezes {paper_backbone})")


ONE_CLASS_FIRST_TASK = ("a one-class first task cannot train a backbone (pretrained=false trains it with "
                        "cross-entropy on task 1's classes, and with one class the loss is 0 from the first batch); "
                        "use `dynammo pretrain` (self-supervised, no labels) and pretrained=RUN/backbone.pt, or "
                        "pretrained: PATH (or backbone_epochs=0 to keep a random frozen backbone)")


def check_backbone_can_train(cfg, num_classes: int) -> None:
    """Refuse, before anything is written, the task-1 backbone training of a run without weights
    when task 1 has a single class. A dataset-per-task stream's first task size is only known once
    its datasets are loaded; train_backbone_then_freeze refuses it there."""
    if cfg.pretrained or backbone_epochs(cfg) == 0 or isinstance(cfg.dataset, list):
        return
    if task_sizes(num_classes, cfg.init_cls, cfg.increment)[0] == 1:
        raise UserError(ONE_CLASS_FIRST_TASK)


def train_backbone_then_freeze(method, task: Task) -> None:
    """pretrained=false: plain training of backbone + a linear head on `task`, then freeze."""
    net, epochs = method.net, backbone_epochs(method.cfg)
    if epochs > 0 and task.size == 1:
        raise UserError(ONE_CLASS_FIRST_TASK)
    if epochs > 0:
        method.engine.console.print(f"pretrained=false: training the backbone on task {task.id + 1}'s data for "
                                    f"{epochs} epochs, then freezing it (set pretrained=PATH for the paper's protocol)")
        backbone = net.backbone.train()
        head = nn.Linear(backbone.out_dim, task.size).to(method.device)

        def loss(batch: Batch):
            logits = head(backbone(batch.x))
            return F.cross_entropy(logits, batch.y - task.start), logits, batch.y - task.start

        method.engine.fit(itertools.chain(backbone.parameters(), head.parameters()), method.scenario.train_data(task),
                          loss, OptimSettings.from_config(method.cfg, epochs=epochs), stage="backbone")
    net.freeze_backbone()
