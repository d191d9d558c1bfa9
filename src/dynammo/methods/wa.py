"""WA: weight aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental
Learning", CVPR 2020).

- Training (every task): the task's data + the exemplar memory; loss CE over all seen classes +
  KD (temperature T, default 2) on the old classes' logits against a frozen copy of the network
  taken at the start of the task (`methods/distill.py`). `kd_weight: sum` (CE + KD) is the
  reference framework's; `adaptive` ((1 - l) CE + l KD, l = n_old / n_seen) is the paper's.
- Weight clipping (`weight_clipping`, default true, the paper's): after every optimiser step the
  classifier's weights are clipped to be non-negative (the features after ReLU + pooling are
  non-negative, so this keeps the norms meaningful). The reference framework does not clip; set
  `weight_clipping: false` to reproduce it.
- Weight aligning (tasks t >= 1, after training): gamma = mean_norm(old classes' weight rows) /
  mean_norm(new classes' weight rows); the new rows are multiplied by gamma, so both groups have
  the same mean norm. Old rows and every bias stay as they are (as the paper and the reference).
"""
from __future__ import annotations

import torch

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.engine import OptimSettings
from dynammo.methods import METHODS
from dynammo.methods.distill import DistillMethod, kd_options


@torch.no_grad()
def align_weights(weight: torch.Tensor, n_old: int) -> float:
    """Scale rows n_old: of `weight` (C, d) in place so that their mean L2 norm equals that of rows
    :n_old. Returns gamma = mean_norm_old / mean_norm_new (1 when the new rows are all zero)."""
    norms = weight.float().norm(p=2, dim=1)
    new_norm = norms[n_old:].mean()
    if n_old == 0 or n_old >= len(norms) or new_norm == 0:
        return 1.0
    gamma = norms[:n_old].mean() / new_norm
    weight[n_old:] *= gamma.to(weight.dtype)
    return float(gamma)


@METHODS.register("wa", aliases=("weight_aligning", "weight_align", "wa_il"))
class WA(DistillMethod):
    summary = "rehearsal + KD, new-class classifier weights aligned to the old classes' mean norm (CVPR 2020)"
    options = {
        **kd_options("sum"),
        "weight_clipping": Option("bool", True, "clip the classifier weights to >= 0 after every optimiser step "
                                                "(the paper; the reference framework does not)"),
    }

    def train_task(self, task: Task) -> None:
        self.train_mode()
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        self.engine.fit(self.net.parameters(), self.training_set(task), self.step, settings,
                        after_step=self.clip_weights if self.cfg.weight_clipping else None)
        if task.id > 0:
            gamma = align_weights(self.net.head.fc.weight, self.known)
            self.engine.console.print(f"{self.engine.task_label} weight aligning: gamma {gamma:.4f}")

    def clip_weights(self) -> None:
        with torch.no_grad():
            self.net.head.fc.weight.clamp_(min=0)
