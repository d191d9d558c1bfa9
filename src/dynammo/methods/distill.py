"""Knowledge distillation shared by the methods that distil an old model's outputs (iCaRL, WA,
BiC, and any other method that wants softened old-logit distillation).

- `kd_loss`: the softened old-logit distillation loss (Hinton et al. 2015, as used by LwF, iCaRL's
  reference implementation, BiC and WA), one function for every method.
- `frozen_copy`: the old model, a frozen eval-mode copy of the network.
- `DistillMethod`: the common skeleton of iCaRL, WA and BiC: rehearsal on the task's data + the
  exemplar memory, a frozen copy of the network taken at the start of every task t >= 1 (the
  teacher), and the loss CE + KD on the old classes' logits.

The old model is taken in `begin_task`, before the head grows, so it is exactly the network at
the end of task t-1: the model saved in that task's checkpoint. Reloading that checkpoint and
starting task t rebuilds the same teacher, bit for bit.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Task
from dynammo.methods.base import Method


def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """Softened distillation of an old model's logits into the new model's.

        kd = - 1/B * sum_b sum_{k < K} softmax(old_logits_b / T)_k * log_softmax(logits_b[:K] / T)_k

    logits: (B, C) of the model being trained; old_logits: (B, K) of the frozen old model, K <= C.
    Only the first K columns of `logits` (the classes the old model knows) take part, and the
    softmax of both sides runs over those K classes only. It is the cross-entropy between the
    softened distributions (the KL divergence plus the teacher's entropy, a constant: the same
    gradient as KL), averaged over the batch and NOT multiplied by T^2, exactly the loss of the
    reference framework and of BiC (Wu et al. 2019, Eq. 2) and WA (Zhao et al. 2020). T = 2 in all
    three papers. Computed in float32 (safe under mixed precision); the teacher gets no gradient.
    """
    k = old_logits.shape[1]
    if k == 0:
        return logits.new_zeros(()).float()
    if logits.shape[1] < k:
        raise ValueError(f"kd_loss: the new model has {logits.shape[1]} outputs, fewer than the old model's {k}")
    log_p = F.log_softmax(logits[:, :k].float() / T, dim=1)
    q = F.softmax(old_logits.detach().float() / T, dim=1)
    return -(q * log_p).sum(dim=1).mean()


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of `net` with every parameter frozen, in eval mode (the old model / teacher)."""
    old = copy.deepcopy(net)
    for p in old.parameters():
        p.requires_grad_(False)
    return old.eval()


def kd_options(kd_weight: str = "sum") -> dict:
    """Config keys of a distilling method: the temperature and how CE and KD are weighted."""
    return {
        "T": Option("float", 2.0, "distillation temperature (softmax of the logits / T)", min=0.0, min_open=True),
        "kd_weight": Option("str", kd_weight, "CE and KD weighting: sum (CE + KD) | adaptive ((1 - l) CE + l KD with "
                                              "l = n_old / n_seen, as BiC and the WA paper)",
                            choices=("sum", "adaptive")),
    }


class DistillMethod(Method):
    """Rehearsal + distillation of the old model's logits: CE on every seen class + KD on the old ones.

    Subclasses change `grow` (structure), `train_task` (stages), `distill` (the distillation term)
    or `lamda` (its weight).
    """

    uses_memory = True
    options = kd_options()
    old_net: Optional[nn.Module] = None

    def begin_task(self, task: Task) -> None:
        # The teacher: the network as it ended task t-1 (before the head grows), frozen.
        self.old_net = frozen_copy(self.net).to(self.device) if task.id > 0 else None
        self.grow(task)

    def grow(self, task: Task) -> None:
        """Structure only (the head grows), no teacher: `load_state_dict` replays this per task."""
        Method.begin_task(self, task)

    def training_set(self, task: Task) -> ImageSet:
        return ImageSet.concat([self.scenario.train_data(task), self.memory.as_imageset()])

    def kd_weight(self) -> str:
        """How CE and KD combine: "adaptive" or "sum" (WA takes it from its preset)."""
        return self.cfg.kd_weight

    def lamda(self) -> float:
        """Weight l of the KD term: loss = (1 - l) CE + l KD ("adaptive") or CE + KD ("sum", l = 1)."""
        if self.kd_weight() == "adaptive":
            return self.known / self.total
        return 1.0

    def old_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.old_net(x)

    def distill(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return kd_loss(logits, self.old_logits(batch.x), self.cfg.T)

    def step(self, batch: Batch):
        logits = self.net(batch.x)
        ce = F.cross_entropy(logits, batch.y)
        if self.old_net is None:
            return ce, logits, batch.y
        lam = self.lamda()
        ce_weight = 1.0 - lam if self.kd_weight() == "adaptive" else 1.0
        return ce_weight * ce + lam * self.distill(logits, batch), logits, batch.y

    def end_task(self, task: Task) -> None:
        super().end_task(task)
        self.old_net = None  # the teacher is only needed while training; free its memory
