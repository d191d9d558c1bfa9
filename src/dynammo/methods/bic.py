"""BiC: bias correction (Wu et al., "Large Scale Incremental Learning", CVPR 2019).

For every task t >= 1:
- Split: the exemplars of every old class and the training images of every new class are split
  into a training part and a small class-balanced validation part: n_val = max(1, int(split_ratio
  * m)) images per class (m = the memory quota per old class, split_ratio 0.1: the paper's 9:1 of
  the exemplars), drawn at random with the run's seed. The validation part is held out of stage 1.
- Stage 1: train backbone + classifier on the training part with
  (1 - l) CE + l KD(T = 2) on the old classes' logits, l = n_old / n_seen (the paper's weighting;
  `kd_weight: sum` gives CE + KD), against a frozen copy of the network taken at the start of the
  task (bias layers included, as it was at inference).
- Stage 2: a bias layer with two parameters (alpha = 1, beta = 0 at the start) rescales the new
  classes' logits only, o_k -> alpha * o_k + beta for the task's classes; it alone is trained, with
  CE on the validation part, the rest of the model frozen and in eval mode.

Every task's bias layer stays in the network, frozen after its stage 2, and is applied at
inference (and by the teacher of later tasks), so a checkpoint holds and reloads all of them.
Stage 2 trains with `*_bias` settings (epochs_bias, lrate_bias, ...) that default to stage 1's, as
in the reference framework, except weight decay: `weight_decay_bias` is 0 by default, since the
paper fits only alpha and beta by cross-entropy and an L2 term would pull alpha (1 at the start)
towards 0 (the reference framework and PyCIL keep stage 1's weight decay: set it to reproduce them). Unlike the reference, stage 2 keeps the BatchNorm statistics frozen
(eval mode) and uses plain cross-entropy on the corrected logits (the reference applies a softmax
before its cross-entropy, a double softmax).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.distill import DistillMethod, kd_options
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.models.network import IncrementalNet
from dynammo.optim import OptimSettings, stage_options


class BiasLayer(nn.Module):
    """o -> o with columns [start, end) replaced by alpha * o + beta; every other column untouched."""

    def __init__(self, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        s, e = self.start, self.end
        corrected = self.alpha * logits[:, s:e] + self.beta
        return torch.cat([logits[:, :s], corrected.to(logits.dtype), logits[:, e:]], dim=1)

    def extra_repr(self) -> str:
        return f"classes {self.start}..{self.end - 1}"


class BiasCorrectedNet(IncrementalNet):
    """Backbone + growing linear head + one bias layer per task t >= 1, applied in order."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.bias_layers = nn.ModuleList()

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def correct(self, logits: torch.Tensor) -> torch.Tensor:
        for layer in self.bias_layers:
            logits = layer(logits)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.correct(self.raw_logits(x))


@METHODS.register("bic", aliases=("bias_correction", "bic_il"))
class BiC(DistillMethod):
    summary = "rehearsal + KD, then a 2-parameter bias layer on the new classes' logits trained on a held-out split (CVPR 2019)"
    options = {
        **kd_options("adaptive"),
        "split_ratio": Option("float", 0.1, "share of each class's exemplars (m per class) held out for the bias "
                                            "layer: max(1, int(split_ratio * m)) images of every old and new class",
                              min=0.0, max=1.0, min_open=True, max_open=True),
        **stage_options("_bias", "stage 2 (bias layer)", defaults=dict(weight_decay=0.0),
                        faithful=dict(weight_decay=0.0),
                        notes=dict(weight_decay="0: the paper fits alpha and beta by cross-entropy alone; the "
                                                "reference framework keeps stage 1's")),
    }

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        if not 0.0 < cfg.split_ratio < 1.0:
            raise UserError(f"split_ratio={cfg.split_ratio} must be between 0 and 1 (the paper holds out 0.1)")

    def build_network(self) -> nn.Module:
        return BiasCorrectedNet(build_backbone(self.cfg.backbone, self.cfg.pretrained,
                                               **backbone_kwargs(self.cfg, self.scenario)))

    def grow(self, task: Task) -> None:
        super().grow(task)
        if task.id > 0:
            for old in self.net.bias_layers:
                old.requires_grad_(False)
            self.net.bias_layers.append(BiasLayer(task.start, task.end).to(self.device))

    # ---- training ----
    def split(self, task: Task) -> Tuple[ImageSet, ImageSet]:
        """(stage 1 training set, class-balanced validation set) of the memory + the task's data."""
        n_val = max(1, int(self.cfg.split_ratio * self.memory.quota(task.start)))
        new = self.scenario.train_data(task)
        per_class = [s for _, s in sorted(self.memory.per_class.items())] + [new.of_classes([c]) for c in task.classes]
        train, val = [], []
        for s in per_class:
            perm = torch.randperm(len(s), generator=self.engine.generator)
            k = min(n_val, len(s))
            val.append(s.subset(perm[:k].sort().values))
            train.append(s.subset(perm[k:].sort().values))
        return ImageSet.concat(train), ImageSet.concat(val)

    def train_task(self, task: Task) -> None:
        if task.id == 0:
            train, val = self.scenario.train_data(task), None
        else:
            train, val = self.split(task)
            self.engine.console.print(f"{self.engine.task_label} BiC split: {len(train)} images for stage 1, "
                                      f"{len(val)} held out for the bias layer; lambda {self.lamda():.3f}")
        self.train_mode()
        params = [p for name, p in self.net.named_parameters() if not name.startswith("bias_layers.")]
        self.engine.fit(params, train, self.step, OptimSettings.from_config(self.cfg, first_task=task.id == 0),
                        stage="stage1" if val is not None else "train")
        if val is not None:
            self.train_bias(val)

    def train_bias(self, val: ImageSet) -> None:
        """Stage 2: only the last bias layer trains, on the held-out split; the rest is frozen, eval mode."""
        layer = self.net.bias_layers[-1]
        self.net.eval()

        def loss(batch: Batch):
            with torch.no_grad():
                raw = self.net.raw_logits(batch.x)
            logits = self.net.correct(raw)
            return F.cross_entropy(logits.float(), batch.y), logits, batch.y

        self.engine.fit(layer.parameters(), val, loss, OptimSettings.from_config(self.cfg, "_bias"), stage="bias")
        layer.requires_grad_(False)
        self.engine.console.print(f"{self.engine.task_label} bias layer: alpha {layer.alpha.item():.4f}, "
                                  f"beta {layer.beta.item():.4f}")
