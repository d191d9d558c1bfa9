"""First-task adaptation of a frozen backbone, shared by APER and RanPAC.

Both papers adapt the pretrained model on the first task only, with a plain linear head and
cross-entropy, and freeze it for good afterwards (Zhou et al., IJCV 2024, sec. 4; McDonnell et al.,
NeurIPS 2023, "phase 1"). The variants here, as a key of each method:
- `adapter`: on a CNN, this project's ACL adapters (`models/adapters.py`: a residual adapter at the
  input of every chosen stage, run through the backbone's stage hook) on the frozen backbone. The
  papers' adapter is AdaptFormer's bottleneck MLP inside each ViT block, which a CNN does not have:
  a recorded deviation. It needs a backbone with stages (not a ViT).
- `finetune`: every backbone weight trains (the papers' full fine-tuning variant); any backbone.

The optimiser and budget are the run's general keys (`epochs`, `lrate`, `opt_type`, ...), so the
adaptation is the run's one training stage when weights are given.
"""
from __future__ import annotations

import copy
import itertools
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.scenario import Task, task_sizes
from dynammo.errors import UserError
from dynammo.methods.acl import check_adapter_stages
from dynammo.models.adapters import AdapterSet, stage_channels
from dynammo.models.backbones import backbone_has_stages
from dynammo.optim import OptimSettings

VARIANTS = ("adapter", "finetune")
LAYER_NAMES = Option("str_list", None, "adapter variant: backbone stages that get an adapter at their input "
                                       "(default: all)", nonempty=True, unique=True)
CNN_ADAPTER_DEVIATION = ("first-task adapter = ACL's residual adapters at the input of the CNN's stages "
                         "(the paper's is AdaptFormer's MLP adapter in each ViT block)")


def check_adaptation(cfg, num_classes: int, variant: str, key: str) -> None:
    """Refuse, before anything is written, an adaptation the backbone or the first task cannot take."""
    if variant == "adapter":
        if not backbone_has_stages(cfg.backbone):
            raise UserError(f"{key}=adapter puts ACL's adapters at the input of residual stages, and backbone="
                            f"{cfg.backbone} has none; set {key}=finetune (or a ResNet/EfficientNet backbone)")
        check_adapter_stages(cfg)
    if variant != "none" and not isinstance(cfg.dataset, list) \
            and task_sizes(num_classes, cfg.init_cls, cfg.increment)[0] == 1:
        raise UserError(f"{key}={variant} trains on the first task with cross-entropy, and a one-class first task "
                        f"gives a loss of 0; set init_cls >= 2" + (f" or {key}=none" if key == "ranpac_adapt" else ""))


class TunedBackbone(nn.Module):
    """The backbone adapted on the first task, then frozen (kept in eval mode).

    adapter: shares `backbone` (frozen) and adds an adapter set through the stage hook.
    finetune: trains `backbone` itself (copy_weights=False, RanPAC: the pretrained weights are not
    used afterwards) or its own copy (copy_weights=True, APER: both are used at inference)."""

    def __init__(self, backbone: nn.Module, variant: str, copy_weights: bool, layer_names: Optional[List[str]] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown first-task variant {variant!r}")
        self.variant = variant
        self.out_dim = backbone.out_dim
        self.adapters: Optional[AdapterSet] = None
        if variant == "adapter":
            self.backbone = backbone
            self.adapters = AdapterSet(stage_channels(backbone, layer_names))
        else:
            self.backbone = copy.deepcopy(backbone) if copy_weights else backbone
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapters is not None:
            return self.backbone(x, stage_hook=self.adapters.hook)
        return self.backbone(x)

    def start_from(self, backbone: nn.Module) -> None:
        """Begin the adaptation at `backbone`'s current weights (a copy trained on task 1 when the run
        has no pretrained weights)."""
        if self.backbone is not backbone:
            self.backbone.load_state_dict(backbone.state_dict())

    def trainable(self) -> List[nn.Parameter]:
        """What the adaptation trains, made trainable; the modules it trains are put in training mode."""
        params = list((self.adapters if self.adapters is not None else self.backbone).parameters())
        for p in params:
            p.requires_grad_(True)
        self.backbone.eval()  # a frozen backbone's BatchNorm statistics never change
        (self.adapters if self.adapters is not None else self.backbone).train()
        return params

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        self.eval()

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        return self


def adapt_on_first_task(method, task: Task, tuned: TunedBackbone) -> None:
    """Train `tuned` with a fresh linear head and cross-entropy on `task`'s data, then freeze it."""
    tuned.start_from(method.net.backbone)
    method.net.eval()
    params = tuned.trainable()
    head = nn.Linear(tuned.out_dim, task.size).to(method.device)

    def loss(batch: Batch):
        logits = head(tuned(batch.x))
        target = batch.y - task.start
        return F.cross_entropy(logits, target), logits, target

    method.engine.fit(itertools.chain(params, head.parameters()), method.scenario.train_data(task), loss,
                      OptimSettings.from_config(method.cfg, first_task=True), stage=f"adapt ({tuned.variant})")
    tuned.freeze()
