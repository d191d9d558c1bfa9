"""The plain incremental network: backbone + one growing linear head."""
from __future__ import annotations

import torch
import torch.nn as nn

from dynammo.models.backbones import Backbone
from dynammo.models.heads import IncrementalLinear


class IncrementalNet(nn.Module):
    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalLinear(backbone.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
