"""Classifier heads that grow as classes arrive."""
from __future__ import annotations

import torch
import torch.nn as nn


class IncrementalLinear(nn.Module):
    """A linear classifier over all classes seen so far; `expand` adds outputs, keeping old weights."""

    def __init__(self, in_dim: int, num_classes: int = 0):
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Linear(in_dim, num_classes) if num_classes else None

    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def expand(self, n_new: int) -> None:
        old = self.fc
        fc = nn.Linear(self.in_dim, self.num_classes + n_new)
        if old is not None:
            fc = fc.to(old.weight.device)
            with torch.no_grad():
                fc.weight[: old.out_features] = old.weight
                fc.bias[: old.out_features] = old.bias
        self.fc = fc

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)
