"""APER, "AdaPt and mERge" (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained
Models: Generalizability and Adaptivity are All You Need", IJCV 2024, sec. 4; "ADAM" in the first
arXiv version).

- Task 1 only: a copy of the pretrained model is adapted with a linear head and cross-entropy on
  the first task's data (`aper_variant`), then frozen for good. The pretrained backbone itself stays
  frozen throughout.
- The feature of an image is the concatenation [f_pretrained(x), f_adapted(x)] (2 x D values); after
  each task the classifier weight of each new class is the mean of these features over the class's
  training images (test transform), in a cosine classifier, as SimpleCIL (`methods/simplecil.py`).
  Old prototypes never change; no exemplar memory.
- Inference runs the backbone twice per image (pretrained and adapted): both passes are in `cost`.

Variants (`aper_variant`, methods/first_task.py): `adapter` (the paper's best; on a CNN this
project's ACL residual adapters at the input of each stage, where the paper puts AdaptFormer's MLP
adapter in each ViT block: recorded in `deviations`; a ViT backbone is refused with this variant)
and `finetune` (full fine-tuning of the copy, any backbone). The paper's SSF and VPT variants are not
offered. The adaptation trains with the run's general keys (epochs, lrate, opt_type, ...; the
paper: SGD 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, 20 epochs, batch 48).

Without pretrained weights the backbone is first trained on task 1 and frozen (methods/frozen.py),
and the adapted copy starts from it: a recorded deviation.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.first_task import (CNN_ADAPTER_DEVIATION, LAYER_NAMES, TunedBackbone, adapt_on_first_task,
                                        check_adaptation)
from dynammo.methods.frozen import BACKBONE_EPOCHS
from dynammo.methods.simplecil import PrototypeNet, SimpleCIL


class AperNet(PrototypeNet):
    """The frozen pretrained backbone and its first-task-adapted version; prototypes of the
    concatenation of their features."""

    def __init__(self, backbone: nn.Module, variant: str, layer_names=None):
        super().__init__(backbone, 2 * backbone.out_dim)
        self.tuned = TunedBackbone(backbone, variant, copy_weights=True, layer_names=layer_names)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backbone(x), self.tuned(x)], dim=1)


@METHODS.register("aper", aliases=("adam_cil", "aper_adapter"))
class APER(SimpleCIL):
    summary = ("a copy of the frozen backbone adapted on task 1 only; cosine prototypes of the concatenated "
               "pretrained + adapted features (Zhou et al., IJCV 2024); two backbone passes at inference")
    options = {
        "aper_variant": Option("str", "adapter", "how task 1 adapts the copy: adapter (on a CNN: ACL's stage "
                                                 "adapters) | finetune (every weight)",
                               choices=("adapter", "finetune"), faithful="adapter"),
        "layer_names": LAYER_NAMES,
        "backbone_epochs": BACKBONE_EPOCHS,
    }

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        check_adaptation(cfg, num_classes, cfg.aper_variant, "aper_variant")

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        out = super().deviations(cfg)
        if cfg.aper_variant == "adapter":
            out.append(CNN_ADAPTER_DEVIATION)
        return out

    def make_net(self, backbone: nn.Module) -> AperNet:
        return AperNet(backbone, self.cfg.aper_variant, self.cfg.layer_names)

    def freeze_encoder(self) -> None:
        super().freeze_encoder()
        self.net.tuned.freeze()

    def prepare_encoder(self, task: Task) -> None:
        if task.id == 0:
            adapt_on_first_task(self, task, self.net.tuned)
