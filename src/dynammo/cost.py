"""What a method costs: inference FLOPs of what the model actually executes, and parameters."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """FLOPs (2 x multiply-accumulates) of convolutions, matmuls and attention run by fn(x)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(x)
    return int(counter.get_total_flops())


def count_params(modules: Iterable[nn.Module]) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def gflops_per_image(predict: Callable[[torch.Tensor], object], example: torch.Tensor) -> float:
    """GFLOPs per image of one inference call on a batch of one."""
    return count_flops(predict, example[:1]) / 1e9
