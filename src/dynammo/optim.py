"""How one training stage optimises: its settings, read from the config keys of the stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from dynammo.errors import UserError


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
        raise UserError(f"opt_type '{self.opt_type}' is not supported; use sgd, adam or adamw")

    def schedule(self, opt):
        if self.scheduler == "multi_step" and self.milestones:
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.lrate_decay)
        if self.scheduler == "cos":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        return None
