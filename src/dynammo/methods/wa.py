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

from typing import Dict, List

import torch
import torch.nn.functional as F

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.engine import Batch, OptimSettings
from dynammo.methods import METHODS
from dynammo.methods.distill import DistillMethod, kd_options

# The two named recipes; `kd_weight` / `weight_clipping` left unset (null) take the preset's value.
PRESETS: Dict[str, Dict[str, object]] = {
    # Zhao et al. 2020: (1 - l) CE + l KD with l = n_old / n_seen, FC weights clipped to >= 0 after every step
    "paper": {"kd_weight": "adaptive", "weight_clipping": True},
    # CL_Pytorch (the reference framework): CE + KD, no clipping
    "reference": {"kd_weight": "sum", "weight_clipping": False},
}


def resolve_preset(cfg) -> Dict[str, object]:
    """The CE/KD weighting and clipping a run uses: the preset's values, each overridden by its key when set."""
    preset = PRESETS[cfg.get("wa_preset") or "paper"]
    return {key: preset[key] if cfg.get(key) is None else cfg.get(key) for key in preset}


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
        "wa_preset": Option("str", "paper", "paper: (1 - l) CE + l KD (l = n_old / n_seen) + FC weights clipped to >= 0 "
                                            "(Zhao et al. 2020) | reference: CE + KD, no clipping (CL_Pytorch)",
                            choices=tuple(PRESETS), faithful="paper"),
        "kd_weight": Option("str", None, "CE and KD weighting, overrides the preset's: sum (CE + KD) | adaptive "
                                         "((1 - l) CE + l KD, l = n_old / n_seen); null: the preset's",
                            choices=("sum", "adaptive"), nullable=True),
        "weight_clipping": Option("bool", None, "clip the classifier weights to >= 0 after every optimiser step, "
                                                "overrides the preset's; null: the preset's (paper: true, "
                                                "reference: false)", nullable=True),
    }

    def __init__(self, cfg, engine, scenario):
        super().__init__(cfg, engine, scenario)
        self.recipe = resolve_preset(cfg)

    # ---- what runs, recorded (results.json `deviations`, the table label) ----
    @classmethod
    def variant_options(cls, cfg) -> Dict[str, object]:
        """wa_preset when not the paper's, and every override that changes its preset's value."""
        changed = dict(super().variant_options(cfg))
        preset = PRESETS[cfg.get("wa_preset") or "paper"]
        changed.update({key: cfg.get(key) for key in preset if cfg.get(key) is not None and cfg.get(key) != preset[key]})
        return changed

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        """One line per place where the CE/KD weighting or the clipping is not the paper's."""
        mine = ("wa_preset",) + tuple(PRESETS["paper"])
        lines = [line for line in super().deviations(cfg) if line.split("=", 1)[0] not in mine]
        recipe, paper = resolve_preset(cfg), PRESETS["paper"]
        if recipe == PRESETS["reference"]:
            return lines + ["WA reference preset: CE + KD (sum), no weight clipping (CL_Pytorch), instead of the "
                            "paper's (1 - l) CE + l KD with l = n_old / n_seen and FC weights clipped to >= 0"]
        origin = {key: f"{key}={cfg.get(key)}" if cfg.get(key) is not None else f"wa_preset={cfg.get('wa_preset')}"
                  for key in paper}
        if recipe["kd_weight"] != paper["kd_weight"]:
            lines.append(f"WA loss CE + KD (sum; {origin['kd_weight']}) instead of the paper's (1 - l) CE + l KD, "
                         "l = n_old / n_seen")
        if recipe["weight_clipping"] != paper["weight_clipping"]:
            lines.append(f"WA without weight clipping ({origin['weight_clipping']}): the paper clips the FC weights "
                         "to >= 0 after every step")
        return lines

    # ---- training ----
    def lamda(self) -> float:
        return self.known / self.total if self.recipe["kd_weight"] == "adaptive" else 1.0

    def step(self, batch: Batch):
        logits = self.net(batch.x)
        ce = F.cross_entropy(logits, batch.y)
        if self.old_net is None:
            return ce, logits, batch.y
        lam = self.lamda()
        ce_weight = 1.0 - lam if self.recipe["kd_weight"] == "adaptive" else 1.0
        return ce_weight * ce + lam * self.distill(logits, batch), logits, batch.y

    def train_task(self, task: Task) -> None:
        self.train_mode()
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        self.engine.fit(self.net.parameters(), self.training_set(task), self.step, settings,
                        after_step=self.clip_weights if self.recipe["weight_clipping"] else None)
        if task.id > 0:
            gamma = align_weights(self.net.head.fc.weight, self.known)
            self.engine.console.print(f"{self.engine.task_label} weight aligning: gamma {gamma:.4f}")

    def clip_weights(self) -> None:
        """The paper's clipping: the FC layer's weights only (not its bias, not the backbone)."""
        with torch.no_grad():
            self.net.head.fc.weight.clamp_(min=0)
