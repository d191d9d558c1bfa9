"""BatchNorm over the global batch of a multi-process run (torchrun; see distributed.py).

Each process trains on its slice of the global batch. A BatchNorm that trains here normalises with
the mean and variance of the whole global batch, and its backward uses the global sums of the
output gradient, so the processes together compute the one-process BatchNorm (up to the order of
float sums). The running statistics are updated from the global statistics, identically on every
process, so nothing needs averaging afterwards.

- NCCL (CUDA tensors): torch's SyncBatchNorm function.
- gloo (CPU), whose tensors torch's SyncBatchNorm refuses: `GlobalBatchNormFunction`. Its forward
  all-reduces the per-channel sum, sum of squares and count; its backward all-reduces sum(dy) and
  sum(dy * x_hat). Uneven slices (a global batch of 7 = 4 + 3) and empty ones (the second process's
  share of a last batch of 1) take part with their own counts.

How it reaches every BatchNorm: inside `training_step(world)` (the engine's forward and backward
of one step) on a multi-process run, `torch.nn.functional.batch_norm`, which torch's and timm's
BatchNorm layers call, is replaced by `batch_norm`, which takes the global route for a layer that
trains (batch statistics) and the plain one otherwise. Outside the step nothing is replaced:
`Engine.apply` (herding, class means, evaluation, BatchNorm re-estimation) and `before_step` hooks
(GEM's memory gradients, which every process computes identically on its own) are plain BatchNorm.

A pass that every process computes identically on the same images inside the step (DER++'s replay
batches) runs inside `shared_pass()`: each process holds that whole batch, so the layer normalises
it locally, as one process does, and the engine's slice weights (which sum to 1) count its gradient
once.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from dynammo.distributed import World

_step_world: Optional[World] = None  # set inside `training_step` on a multi-process run
_shared_depth = 0  # > 0 inside `shared_pass`
_plain_batch_norm = F.batch_norm


@contextlib.contextmanager
def training_step(world: World):
    """The forward and backward of one training step: BatchNorm layers in train mode normalise with
    the global batch's statistics (nothing changes on one process)."""
    global _step_world
    if not world.distributed:
        yield
        return
    previous, _step_world = _step_world, world
    F.batch_norm = batch_norm
    try:
        yield
    finally:
        _step_world = previous
        if previous is None:
            F.batch_norm = _plain_batch_norm


@contextlib.contextmanager
def shared_pass():
    """Forward passes on a batch every process holds whole (a replay batch drawn from the shared
    generator): BatchNorm normalises it locally, as one process does."""
    global _shared_depth
    _shared_depth += 1
    try:
        yield
    finally:
        _shared_depth -= 1


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """`F.batch_norm` inside a multi-process training step: batch statistics are the global batch's."""
    if not training or _step_world is None or _shared_depth:
        return _plain_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return global_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps, _step_world)


class GlobalBatchNormFunction(torch.autograd.Function):
    """Batch normalisation of this process's slice with the statistics of the global batch (gloo)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, world: World):
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        local = torch.cat([xc.sum(dims, dtype=torch.float64), (xc * xc).sum(dims, dtype=torch.float64),
                           torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)])
        totals = world.sum_(local.to(world.device())).to(x.device)
        count = float(totals[-1])
        if count <= 1:  # as torch's BatchNorm on one process
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {int(count)}")
        mean = totals[:channels] / count
        var = (totals[channels:2 * channels] / count - mean * mean).clamp_(min=0)  # the biased batch variance
        invstd = (var + eps).rsqrt()
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        x_hat = (xc - mean.to(compute).view(shape)) * invstd.to(compute).view(shape)
        y = x_hat if weight is None else x_hat * weight.to(compute).view(shape)
        if bias is not None:
            y = y + bias.to(compute).view(shape)
        ctx.save_for_backward(x_hat, weight, invstd.to(compute))
        ctx.world, ctx.count, ctx.dims, ctx.shape = world, count, dims, shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, invstd = ctx.saved_tensors
        dims, shape, channels = ctx.dims, ctx.shape, x_hat.shape[1]
        dyc = dy.to(x_hat.dtype)
        sum_dy = dyc.sum(dims)
        sum_dy_xhat = (dyc * x_hat).sum(dims)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # the same on every process: every one takes part in the reduction
            totals = ctx.world.sum_(torch.cat([sum_dy, sum_dy_xhat]).double().to(ctx.world.device()))
            totals = totals.to(x_hat.device, x_hat.dtype)
            mean_dy, mean_dy_xhat = totals[:channels] / ctx.count, totals[channels:] / ctx.count
            scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
            grad_x = (scale.view(shape) * (dyc - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape))).to(dy.dtype)
        # the parameters' gradients stay this slice's: the engine's all-reduce sums them over processes
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def global_batch_norm(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float,
                      world: World) -> torch.Tensor:
    """Train-mode batch norm of this slice with the global batch's statistics."""
    if x.is_cuda and dist.get_backend() == "nccl":
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNorm

        return TorchSyncBatchNorm.apply(x, weight, bias, running_mean, running_var, eps, momentum,
                                        dist.group.WORLD, world.size)
    return GlobalBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps, world)


def trains_batchnorm(module: Optional[nn.Module]) -> bool:
    """Whether a training step of `module` takes part in BatchNorm collectives (a BatchNorm in train mode)."""
    return module is not None and any(isinstance(m, _BatchNorm) and m.training for m in module.modules())
