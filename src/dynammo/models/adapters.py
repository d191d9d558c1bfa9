"""Residual adapters for a frozen CNN backbone, adapter sets, and merging them.

The adapter is the one of ACL (Zhang et al., "Adapter Learning in Pretrained Feature Extractor for
Continual Learning of Diseases", MICCAI 2023), placed serially at the input of a residual stage:

    x <- x + A(x),   A(x) = alpha * ReLU(BN(ConvT3x3(ReLU(BN(Conv3x3(x))))))

both convolutions C -> C channels, stride 1, padding 0, with bias (the transposed convolution
restores the H x W the plain one removed); alpha is one learnable scalar, initialised to 0.02.

Merging follows DynaMMo (Qazi et al., "DynaMMo: Dynamic Model Merging for Efficient Class
Incremental Learning for Medical Images", MIUA 2024): the merged adapter is the uniform element-wise
mean of the task adapters, W = (1/t) sum_i W_i. It is kept as an exact running mean,
m_t = ((t-1) m_{t-1} + w_t) / t, so only the merged set and the last task set are ever stored.
Every floating-point parameter and buffer is averaged, BatchNorm running_mean/var included (the
faithful heuristic; `bn_reestimation` re-estimates them from data instead); the integer
`num_batches_tracked` is never averaged.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from dynammo.errors import UserError


class Adapter(nn.Module):
    """A(x) = alpha * ReLU(BN(ConvT3x3(ReLU(BN(Conv3x3(x)))))), C -> C, same H x W (ACL, MICCAI 2023)."""

    def __init__(self, channels: int, alpha: float = 0.02):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=0, bias=True)
        self.bn1 = nn.BatchNorm2d(channels)
        self.deconv = nn.ConvTranspose2d(channels, channels, 3, stride=1, padding=0, bias=True)
        self.bn2 = nn.BatchNorm2d(channels)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 3 or x.shape[-2] < 3:
            raise UserError(f"an adapter's 3x3 convolution (no padding) needs feature maps of at least 3x3, got "
                            f"{tuple(x.shape[-2:])}; raise img_size or leave that stage out of layer_names")
        h = F.relu(self.bn1(self.conv(x)))
        return self.alpha * F.relu(self.bn2(self.deconv(h)))


class AdapterSet(nn.Module):
    """One adapter per insertion point (a backbone stage name). `hook` plugs into
    `Backbone.forward(x, stage_hook=...)` and applies x <- x + A(x) at the stages it holds."""

    def __init__(self, channels: Dict[str, int], alpha: float = 0.02):
        super().__init__()
        self.adapters = nn.ModuleDict({name: Adapter(c, alpha) for name, c in channels.items()})

    @property
    def names(self) -> List[str]:
        return list(self.adapters.keys())

    def hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.adapters:
            return x
        return x + self.adapters[name](x)

    def copy(self) -> "AdapterSet":
        """An independent copy: weights, BN statistics and alpha (the next task's initialisation)."""
        return copy.deepcopy(self)

    def freeze(self) -> "AdapterSet":
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def stage_channels(backbone, layer_names: Sequence[str] = None) -> Dict[str, int]:
    """{stage name: input channels} for the stages that get an adapter (default: every stage)."""
    available = dict(zip(backbone.stage_names, backbone.stage_channels()))
    names = list(layer_names) if layer_names else list(backbone.stage_names)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f"layer_names {unknown} are not stages of this backbone; "
                        f"choose among {', '.join(backbone.stage_names)}")
    if len(set(names)) != len(names):
        raise UserError(f"layer_names {names} lists a stage twice; list each stage once")
    return {n: available[n] for n in names}


def _averaged_tensors(s: nn.Module) -> Iterator[tuple]:
    """(name, tensor) of every floating-point parameter and buffer; integer buffers
    (BatchNorm's num_batches_tracked) are skipped."""
    for name, t in list(s.named_parameters()) + list(s.named_buffers()):
        if t.is_floating_point():
            yield name, t


@torch.no_grad()
def running_mean_(merged: AdapterSet, new: AdapterSet, t: int) -> AdapterSet:
    """In place: merged <- ((t-1) * merged + new) / t, where merged held the mean of t-1 task sets
    and `new` is the t-th. Exact (not an exponential average) for every t >= 1."""
    if t < 1:
        raise ValueError("t counts the task sets merged, including the new one: t >= 1")
    theirs = dict(_averaged_tensors(new))
    for name, m in _averaged_tensors(merged):
        m.mul_((t - 1) / t).add_(theirs[name].to(m.dtype), alpha=1.0 / t)
    return merged


@torch.no_grad()
def mean_of(sets: Sequence[AdapterSet]) -> AdapterSet:
    """A new set holding the uniform element-wise mean of `sets` (the batch form of the merge)."""
    out = sets[0].copy()
    stacks = [dict(_averaged_tensors(s)) for s in sets]
    for name, t in _averaged_tensors(out):
        t.copy_(torch.stack([st[name] for st in stacks]).mean(0))
    return out


@contextmanager
def bn_reestimation(module: nn.Module):
    """Inside the block, forward passes re-estimate the BatchNorm statistics of `module` from
    scratch (statistics reset, cumulative average over batches, train mode); the previous
    momentum and train/eval flags come back afterwards. Run the passes under torch.no_grad()."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        yield
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
