"""How one training stage optimises: its settings, read from the config keys of the stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from dynammo.config import OPT_TYPES, SCHEDULERS, Option
from dynammo.errors import UserError

# The keys a method's later stage may set apart from the task's training (`epochs_finetune`,
# `lrate_bias`, ...), with their kind, what the help calls them and their valid values; opt_mom,
# lrate_decay and batch_size are the general keys' in every stage.
_STAGE_KEY_SHAPES = {
    "epochs": ("int", "epochs", dict(min=1)),
    "lrate": ("float", "learning rate", dict(min=0.0, min_open=True)),
    "opt_type": ("str", "optimiser", dict(choices=OPT_TYPES)),
    "weight_decay": ("float", "weight decay", dict(min=0.0)),
    "scheduler": ("str", "learning-rate schedule", dict(choices=SCHEDULERS)),
    "milestones": ("int_list", "multi_step milestones", dict(min=1)),
}
STAGE_KEYS = tuple(_STAGE_KEY_SHAPES)


@dataclass
class OptimSettings:
    """How one stage trains. `OptimSettings.from_config(cfg, "_finetune")` reads stage-specific keys
    (epochs_finetune, lrate_finetune, ...) falling back to the general ones."""

    epochs: int
    opt_type: str = "sgd"
    lrate: float = 0.01
    weight_decay: float = 0.0
    opt_mom: float = 0.9
    scheduler: str = "multi_step"
    milestones: List[int] = field(default_factory=list)
    lrate_decay: float = 0.1
    batch_size: int = 32

    @classmethod
    def from_config(cls, cfg, suffix: str = "", first_task: bool = False, **overrides) -> "OptimSettings":
        """first_task: use the reference framework's init_* keys (init_epochs, init_lrate, ...) when set."""
        def pick(key):
            if key in overrides:
                return overrides[key]
            v = cfg.get(key + suffix) if suffix else None
            if v is None and first_task and not suffix:
                v = cfg.get("init_" + key)
            return cfg[key] if v is None else v

        return cls(**{k: pick(k) for k in ("epochs", "opt_type", "lrate", "weight_decay", "opt_mom", "scheduler",
                                           "milestones", "lrate_decay", "batch_size")})

    def optimizer(self, params) -> torch.optim.Optimizer:
        if self.opt_type == "sgd":
            return torch.optim.SGD(params, lr=self.lrate, momentum=self.opt_mom, weight_decay=self.weight_decay)
        if self.opt_type == "adam":
            return torch.optim.Adam(params, lr=self.lrate, weight_decay=self.weight_decay)
        if self.opt_type == "adamw":
            return torch.optim.AdamW(params, lr=self.lrate, weight_decay=self.weight_decay)
        raise UserError(f"opt_type '{self.opt_type}' is not supported; use {', '.join(OPT_TYPES)}")

    def schedule(self, opt):
        if self.scheduler == "multi_step" and self.milestones:
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.lrate_decay)
        if self.scheduler == "cos":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        return None


def stage_options(suffix: str, what: str, defaults: Optional[dict] = None, notes: Optional[dict] = None,
                  faithful: Optional[dict] = None) -> Dict[str, Option]:
    """The Options of one stage's settings, every key of STAGE_KEYS + suffix, as `OptimSettings.from_config(cfg,
    suffix)` reads them. `what` names the stage in the help texts; a key left out of `defaults` defaults to
    None: the general key's value. `notes` adds to a key's help, `faithful` gives a key's paper value."""
    defaults, notes, faithful = defaults or {}, notes or {}, faithful or {}
    unknown = (set(defaults) | set(notes) | set(faithful)) - set(STAGE_KEYS)
    if unknown:  # pragma: no cover - a programming error in a method's declaration
        raise ValueError(f"stage_options: {sorted(unknown)} are not stage keys {STAGE_KEYS}")
    options = {}
    for key, (kind, noun, bounds) in _STAGE_KEY_SHAPES.items():
        default = defaults.get(key)
        extra = [notes[key]] if key in notes else []
        if default is None:
            extra.append(f"default: {key}")
        text = f"{what} {noun}" + (f" ({'; '.join(extra)})" if extra else "")
        if key in faithful:
            bounds = dict(bounds, faithful=faithful[key])
        options[key + suffix] = Option(kind, default, text, **bounds)
    return options
