"""Classifier heads that grow as classes arrive, and the min-others decision over per-task heads
with an "others" output."""
from __future__ import annotations

from typing import Dict, Sequence

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


def min_others(head_logits: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The "min-others" decision of ACL (Zhang et al., MICCAI 2023) over per-task heads whose last
    output is "others" (any class not of that task).

    For head i, p_i = softmax(logits_i) and o_i = p_i["others"]; the task is argmin_i o_i and the
    class is that head's argmax over its real classes. Returns
    - "pred" (B,): the class over all seen classes (task i's classes follow task i-1's);
    - "task_id" (B,): the chosen task;
    - "task_il_logits" (B, n_seen): each head's real-class probabilities in its classes' columns;
    - "logits" (B, n_seen): the same probabilities, minus 2 outside the chosen task, so that its
      argmax is exactly "pred";
    - "known_score" (B,): 1 - min_i o_i, how sure the heads are that the image is of a class they
      know (the reference framework's ACL open-set score; the runner's open-set metrics use it).
    """
    probs = [torch.softmax(z.float(), dim=1) for z in head_logits]
    others = torch.stack([p[:, -1] for p in probs], dim=1)  # (B, T)
    task_id = others.argmin(dim=1)
    real = torch.cat([p[:, :-1] for p in probs], dim=1)  # (B, n_seen)
    sizes = [p.shape[1] - 1 for p in probs]
    # the task of each column, built from Python ints so the shape is static (torch.export-friendly)
    col_task = torch.cat([torch.full((n,), i, dtype=torch.long, device=real.device) for i, n in enumerate(sizes)])
    chosen = col_task.unsqueeze(0) == task_id.unsqueeze(1)
    logits = torch.where(chosen, real, real - 2.0)
    return {"logits": logits, "pred": logits.argmax(dim=1), "task_id": task_id, "task_il_logits": real,
            "known_score": 1.0 - others.amin(dim=1)}
