"""DER: Dynamically Expandable Representation (Yan, Xie & He, "DER: Dynamically Expandable
Representation for Class Incremental Learning", CVPR 2021). Not to be confused with DER++, dark
experience replay (method `der_pp`).

- Each task t adds a feature extractor F_t, initialised as a copy of F_{t-1} (weights and
  BatchNorm statistics; task 0's is the configured backbone). Earlier extractors are frozen and
  stay in eval mode (their BatchNorm statistics never change).
- The representation is the concatenation [F_0(x), ..., F_t(x)]; one linear classifier over all
  seen classes reads it. When it grows, the old classes' weights on the old features are kept; the
  new rows and the new feature columns start from the default initialisation.
- Stage 1 (every task): train F_t, the classifier and, for t >= 1, an auxiliary classifier on
  F_t(x) alone with task t's classes + 1 "old" class (every earlier class), on the task's data plus
  the exemplar memory: loss = CE(classifier) + CE(auxiliary). The auxiliary classifier is only
  used for training and is dropped afterwards.
- Stage 2 (t >= 1), classifier learning: on a class-balanced set (m memory exemplars per old class
  + m herding-chosen images per new class, m = the updated memory quota memory_size // n_seen, as
  DER's authors retrain on the memory after its update; `balanced_quota: old` gives
  memory_size // n_old, a set larger than the memory budget), with every extractor frozen
  and the whole model in eval mode, retrain the classifier with CE(logits / T) (T = 5). The
  classifier is first re-initialised (`classifier_reset`, as the reference framework does).
- No channel-level mask or pruning (the reference reproduction, from-scratch CIFAR-100
  ResNet-32 B0-10 steps: ~70.5 average accuracy). Inference runs every extractor, so parameters
  and FLOPs grow by one backbone per task; `cost` in results.json shows it.
"""
from __future__ import annotations

import copy
import itertools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.memory import balanced_set
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.models.backbones import Backbone, backbone_kwargs, build_backbone
from dynammo.optim import OptimSettings, stage_options


def old_vs_new_labels(y: torch.Tensor, start: int) -> torch.Tensor:
    """The auxiliary classifier's labels: 0 for any earlier class, y - start + 1 for task classes."""
    return torch.where(y >= start, y - start + 1, torch.zeros_like(y))


class ExpandableNet(nn.Module):
    """Extractors whose features are concatenated, and one classifier over the concatenation."""

    def __init__(self, first: Backbone):
        super().__init__()
        self.extractors = nn.ModuleList([first])
        self.feature_dim = first.out_dim  # of one extractor
        self.fc: Optional[nn.Linear] = None

    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def add_extractor(self) -> Backbone:
        """A trainable copy of the newest extractor; every earlier one is frozen."""
        for old in self.extractors:
            old.requires_grad_(False)
            old.eval()
        new = copy.deepcopy(self.extractors[-1]).requires_grad_(True)
        self.extractors.append(new)
        return new

    def expand_classifier(self, n_new: int) -> None:
        """A classifier over every extractor's features and n_new more classes; the old block of
        weights (old classes x old features) is kept."""
        device = next(self.extractors[-1].parameters()).device
        fc = nn.Linear(self.feature_dim * len(self.extractors), self.num_classes + n_new).to(device)
        if self.fc is not None:
            with torch.no_grad():
                fc.weight[: self.fc.out_features, : self.fc.in_features] = self.fc.weight
                fc.bias[: self.fc.out_features] = self.fc.bias
        self.fc = fc

    def train(self, mode: bool = True):
        super().train(mode)
        for old in self.extractors[:-1]:
            old.eval()  # frozen extractors keep their BatchNorm statistics
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(x) for extractor in self.extractors], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@METHODS.register("der", aliases=("dynamic_er", "der_il", "dynamically_expandable_representation"))
class DER(Method):
    summary = ("DER = Dynamically Expandable Representation (CVPR 2021): a new backbone per task, concatenated "
               "features, balanced classifier retraining; not DER++ (see der_pp)")
    uses_memory = True
    options = {
        "T": Option("float", 5.0, "temperature of the classifier-retraining loss CE(logits / T)", min=0.0,
                    min_open=True),
        "classifier_reset": Option("bool", True, "re-initialise the classifier before balanced retraining "
                                                 "(as the reference framework)"),
        "balanced_quota": Option("str", "seen", "images per class of the balanced set: seen (memory_size // n_seen, "
                                                "the updated memory quota, as DER's authors) | old (memory_size // "
                                                "n_old)", choices=("seen", "old"), faithful="seen"),
        **stage_options("_finetune", "classifier-retraining",
                        defaults=dict(opt_type="sgd", weight_decay=0.0, scheduler="multi_step", milestones=[])),
    }

    def build_network(self) -> ExpandableNet:
        return ExpandableNet(build_backbone(self.cfg.backbone, self.cfg.pretrained,
                                            **backbone_kwargs(self.cfg, self.scenario)))

    # ---- structure ----
    def begin_task(self, task: Task) -> None:
        if task.id > 0:
            self.net.add_extractor()
        self.net.expand_classifier(task.size)
        self.net.to(self.device)

    # ---- training ----
    def train_task(self, task: Task) -> None:
        self.train_representation(task)
        if task.id > 0:
            self.train_classifier(task)

    def train_representation(self, task: Task) -> None:
        """Stage 1: the new extractor, the classifier and the auxiliary classifier."""
        net = self.net
        new = net.extractors[-1]
        aux = nn.Linear(net.feature_dim, task.size + 1).to(self.device) if task.id > 0 else None
        data = ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()])
        self.train_mode()

        def loss(batch: Batch):
            feats = [extractor(batch.x) for extractor in net.extractors]
            logits = net.fc(torch.cat(feats, dim=1))
            total = F.cross_entropy(logits, batch.y)
            if aux is not None:
                total = total + F.cross_entropy(aux(feats[-1]), old_vs_new_labels(batch.y, task.start))
            return total, logits, batch.y

        params = [new.parameters(), net.fc.parameters()] + ([aux.parameters()] if aux is not None else [])
        self.engine.fit(itertools.chain(*params), data, loss,
                        OptimSettings.from_config(self.cfg, first_task=task.id == 0), stage="representation")

    def train_classifier(self, task: Task) -> None:
        """Stage 2: the classifier alone, on a class-balanced set, every extractor frozen."""
        net = self.net
        net.eval()  # before herding too: batch statistics must not leak into the BatchNorm buffers
        m = self.memory.quota(task.end if self.cfg.balanced_quota == "seen" else task.start)
        data = balanced_set(self.memory, self.scenario.train_data(task), task.classes, m, self.features,
                            self.engine.generator)
        if self.cfg.classifier_reset:
            net.fc.reset_parameters()

        def loss(batch: Batch):
            with torch.no_grad():
                feats = net.features(batch.x)
            logits = net.fc(feats)
            return F.cross_entropy(logits / self.cfg.T, batch.y), logits, batch.y

        self.engine.fit(net.fc.parameters(), data, loss, OptimSettings.from_config(self.cfg, "_finetune"),
                        stage="classifier")
