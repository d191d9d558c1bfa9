"""One run on several processes (`torchrun --nproc-per-node=N -m dynammo run ...`): NCCL on GPUs,
gloo on CPUs.

The design keeps every rank an exact replica of the others and of the one-process experiment's
stream of random draws:
- `batch_size` is the global batch. Every rank reads and augments the whole global batch with the
  shared seeded generator (the same draws as one process), then trains on its contiguous slice.
- Each rank weights its slice's loss by slice size over global batch size before backward, and
  one all-reduce per step sums the gradients, so the step is the global batch's mean gradient.
  Terms every rank computes identically (a replay batch drawn from the shared generator) keep
  their value, since the weights sum to 1. The reduction runs between backward and the methods'
  `before_step`, so GEM projects the global gradient. No DDP wrapper: models grow every task and
  methods call their submodules directly.
- What a method computes from its data between steps (herding features, class means) goes
  through the sharded, gathered `Engine.apply`, so every rank selects the same memory.
- BatchNorm that trains normalises every slice with the global batch's statistics, and its
  backward sums over the global batch (global_batchnorm.py), so the running statistics are the
  same on every rank and equal one process's.
- Rank 0 writes results, logs and checkpoints; every rank reads them when resuming.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dynammo.errors import UserError


class World:
    """The processes of one run. `World()` is the single-process world: every collective is the
    identity, so the engine calls them unconditionally."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, rank: Optional[int] = None) -> Tuple[int, int]:
        """This rank's contiguous part [start, end) of n items: the first n % size ranks get one more."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = r * base + min(r, extra)
        return start, start + base + (1 if r < extra else 0)

    # ---- collectives (identities on one process) ----
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a signal that reached only some ranks)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.sum_(torch.tensor([1.0 if flag else 0.0], device=self.device())).item() > 0)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks."""
        if self.distributed:
            self.sum_(tensor).div_(self.size)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self) -> torch.device:
        """Where collectives' tensors live: NCCL needs them on this rank's GPU."""
        if self.distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- the step ----
    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], stop: bool) -> bool:
        """Replace each parameter's gradient by its sum over ranks (each rank's loss was weighted by
        its slice's share of the batch; a gradient no rank has stays None, as in one process: SGD's
        momentum and weight decay skip it); returns whether any rank asked to stop. One flat
        all-reduce per step."""
        if not self.distributed:
            return stop
        dev = params[0].device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        pieces = [(p.grad.detach().to(dtype).reshape(-1) if p.grad is not None
                   else torch.zeros(p.numel(), device=dev, dtype=dtype)) for p in params]
        flags = [1.0 if p.grad is not None else 0.0 for p in params] + [1.0 if stop else 0.0]
        flat = torch.cat(pieces + [torch.tensor(flags, device=dev, dtype=dtype)])
        flat = flat.to(self.device())
        self.sum_(flat)
        flat = flat.to(dev)
        offset = 0
        n_params = len(params)
        counts = flat[-n_params - 1:-1]
        for p, count in zip(params, counts.tolist()):
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone() if count > 0 else None
            offset += n
        return bool(flat[-1].item() > 0)


_WORLD = World()


def current_world() -> World:
    return _WORLD


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device_name: str) -> Tuple[World, Optional[str]]:
    """Join the process group torchrun set up (once per process). Returns the world and the device
    this rank uses: `cuda:LOCAL_RANK` when the run is on CUDA, else the CPU (gloo)."""
    global _WORLD
    if not launched_by_torchrun():
        return _WORLD, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = (device_name or "auto").lower()
    use_cuda = torch.cuda.is_available() and wanted != "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device_name}' asked for but CUDA is not available here; use device=cpu")
    if wanted == "mps":
        raise UserError("a distributed run needs cuda or cpu processes; use device=cuda or device=cpu")
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD, device


def close_world() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def state_digest(obj) -> str:
    """A sha256 of every tensor and number in a (nested) state: equal digests on two ranks mean
    bitwise-equal states."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()
