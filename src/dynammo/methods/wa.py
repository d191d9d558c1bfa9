"""WA: weight aligning (Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental
Learning", CVPR 2020).

Two named recipes (`wa_preset`); `kd_weight` and `weight_clipping` (null by default) override one piece
of it, and results.json `deviations` (and the table label) say what departs from the paper:
- `paper` (default): loss (1 - l) CE + l KD with l = n_old / n_seen, and after every optimiser step the
  FC layer's weights (not its bias, not the backbone) are clipped to >= 0, as the paper does (the
  features after ReLU + pooling are non-negative).
- `reference`: CL_Pytorch's CE + KD, no clipping. PyCIL (models/wa.py) uses (1 - l) CE + l KD (CE + 2 KD
  before 2023) and does not clip either; its WA is `wa_preset=reference kd_weight=adaptive`.

The rest is the same in the paper, PyCIL, CL_Pytorch and here:
- Training (every task): the task's data + the exemplar memory; CE over all seen classes; KD
  (temperature T = 2, no T^2 factor, summed over the old classes, averaged over the batch) of the
  old classes' logits against the network as it ended task t-1, aligned, frozen (`methods/distill.py`).
- Weight aligning (tasks t >= 1, after training, before the memory update and the evaluation, kept
  for the next task): gamma = mean_norm(old rows) / mean_norm(new rows); the new rows are multiplied
  by gamma. Old rows and every bias stay as they are.
- New classes' rows (`fc_init: reference`): initialised as PyCIL's and CL_Pytorch's head
  (kaiming-uniform with the linear gain, row norm ~1, zero bias), not nn.Linear's default.

The measurements behind these choices (the reference rows, how clipping fails, the CE + KD step),
taken side by side with PyCIL's WA on the same arrays, and why an old class can be lost at task 2
after a 2-class first task: docs/wa_pycil.md.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.distill import DistillMethod, kd_options
from dynammo.optim import OptimSettings

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


@torch.no_grad()
def init_rows(fc: torch.nn.Linear, start: int) -> None:
    """Rows start: of `fc` as the reference frameworks initialise a new head (PyCIL's and CL_Pytorch's
    SimpleLinear): weights kaiming-uniform with the linear gain, U(-sqrt(3/d), sqrt(3/d)), so each row has
    an expected norm of 1; biases 0. Rows :start (the old classes) are left as they are."""
    rows = torch.empty(fc.out_features - start, fc.in_features)
    torch.nn.init.kaiming_uniform_(rows, nonlinearity="linear")
    fc.weight[start:] = rows.to(fc.weight)
    fc.bias[start:] = 0


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
        "fc_init": Option("str", "reference", "the new classes' classifier rows: reference (PyCIL / CL_Pytorch: "
                                              "kaiming-uniform, linear gain, i.e. U(+-sqrt(3/d)), zero bias) | torch "
                                              "(nn.Linear's default U(+-1/sqrt(d)), random bias: rows ~0.58x as long)",
                          choices=("reference", "torch"), faithful="reference"),
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

    # ---- structure ----
    def grow(self, task: Task) -> None:
        super().grow(task)
        if self.cfg.fc_init == "reference":
            init_rows(self.net.head.fc, task.start)

    # ---- training ----
    def kd_weight(self) -> str:
        return self.recipe["kd_weight"]

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
