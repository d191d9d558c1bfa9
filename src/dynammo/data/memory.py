"""Exemplar memory: a budget policy and the selection of which raw images to keep.

Budget: a fixed total `memory_size` split evenly over the seen classes (M // n_seen per class,
recomputed after every task; old classes are truncated in selection order), or a fixed
`memory_per_class`. Selection: herding (Welling 2009, as used by iCaRL, Rebuffi et al. 2017, on
L2-normalised features), random, closest-to-mean, and reservoir sampling (Vitter 1985, used by
DER++) for online buffers.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

FeatureFn = Callable[[ImageSet], torch.Tensor]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision (autocast) tensors; float32 and float64 stay as they are."""
    return t if t.dtype == torch.float64 else t.float()


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices, in selection order, whose running mean best approximates the class mean."""
    f = F.normalize(at_least_float32(features), dim=1)
    mu = f.mean(0)
    chosen: List[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mu - (running + f) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += f[i]
    return torch.tensor(chosen, dtype=torch.long)


def closest_to_mean(features: torch.Tensor, m: int) -> torch.Tensor:
    f = F.normalize(at_least_float32(features), dim=1)
    dist = ((f - f.mean(0)) ** 2).sum(1)
    return torch.argsort(dist, stable=True)[:m]


def random_choice(n: int, m: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:m]


def select(method: str, data: ImageSet, m: int, features_fn: Optional[FeatureFn],
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Indices into `data` (one class) of the m exemplars, best first."""
    m = min(m, len(data))
    if method in ("random", "reservoir"):
        return random_choice(len(data), m, generator)
    if features_fn is None:
        raise ValueError(f"{method} selection needs a feature extractor")
    feats = features_fn(data)
    return herding(feats, m) if method == "herding" else closest_to_mean(feats, m)


class ExemplarMemory:
    """Per-class exemplar sets, each kept in selection order (best first)."""

    def __init__(self, memory_size: int = 0, memory_per_class: Optional[int] = None,
                 sampling_method: str = "herding"):
        self.memory_size = memory_size
        self.memory_per_class = memory_per_class
        self.sampling_method = sampling_method
        self.per_class: Dict[int, ImageSet] = {}

    @classmethod
    def from_config(cls, cfg) -> "ExemplarMemory":
        return cls(cfg.memory_size, cfg.memory_per_class, cfg.sampling_method)

    @property
    def enabled(self) -> bool:
        return bool(self.memory_per_class) or self.memory_size > 0

    def check_budget(self, num_classes: int) -> None:
        if self.memory_per_class is None and 0 < self.memory_size < num_classes:
            raise UserError(
                f"memory_size={self.memory_size} is smaller than the number of classes ({num_classes}), "
                "so some classes would keep no exemplar; raise memory_size or set memory_per_class"
            )

    def quota(self, n_seen: int) -> int:
        if self.memory_per_class:
            return self.memory_per_class
        return self.memory_size // max(n_seen, 1)

    def update(self, data: ImageSet, new_classes, n_seen: int, features_fn: Optional[FeatureFn] = None,
               generator: Optional[torch.Generator] = None) -> None:
        """Truncate old classes to the new quota, then select exemplars of the new classes."""
        if not self.enabled:
            return
        m = self.quota(n_seen)
        for c, s in self.per_class.items():
            self.per_class[c] = s.subset(torch.arange(min(m, len(s))))
        for c in new_classes:
            cls_data = data.of_classes([c])
            self.per_class[c] = cls_data.subset(select(self.sampling_method, cls_data, m, features_fn, generator))

    def as_imageset(self) -> ImageSet:
        return ImageSet.concat([self.per_class[c] for c in sorted(self.per_class)])

    def __len__(self) -> int:
        return sum(len(s) for s in self.per_class.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored raw images (decoded uint8)."""
        return sum(len(s) * s.nbytes_per_image() for s in self.per_class.values())

    def state_dict(self) -> dict:
        return {c: {"labels": s.labels, "images": s.images, "sources": s.sources, "channels": s.channels,
                    "size": s.size, "aspect": s.aspect} for c, s in self.per_class.items()}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = {int(c): ImageSet(v["labels"], images=v["images"], sources=v["sources"],
                                           channels=v["channels"], size=v["size"], aspect=v.get("aspect"))
                          for c, v in state.items()}


def balanced_set(memory: ExemplarMemory, new_data: ImageSet, new_classes, m: int,
                 features_fn: Optional[FeatureFn] = None, generator: Optional[torch.Generator] = None) -> ImageSet:
    """A class-balanced set: the first m exemplars of every old class + m selected per new class."""
    parts = [s.subset(torch.arange(min(m, len(s)))) for c, s in sorted(memory.per_class.items())
             if c not in set(new_classes)]
    for c in new_classes:
        cls_data = new_data.of_classes([c])
        parts.append(cls_data.subset(select(memory.sampling_method, cls_data, m, features_fn, generator)))
    return ImageSet.concat(parts)


class ReservoirBuffer:
    """A fixed-size buffer filled by reservoir sampling over a stream of batches; each slot holds an
    image, its label and optional extra tensors (DER++ stores logits)."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise UserError("reservoir memory needs memory_size > 0")
        self.capacity = capacity
        self.seen = 0
        self.images: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.extras: Dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, images: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
            **extras: torch.Tensor) -> None:
        images, labels = images.detach().cpu(), labels.detach().cpu()
        if self.images is None:
            self.images = torch.zeros((self.capacity,) + tuple(images.shape[1:]), dtype=images.dtype)
            self.labels = torch.zeros(self.capacity, dtype=torch.long)
        for k, v in extras.items():
            shape = tuple(v.shape[1:])
            buf = self.extras.get(k)
            if buf is None:
                self.extras[k] = torch.zeros((self.capacity,) + shape, dtype=v.dtype)
            elif len(shape) == buf.dim() - 1 and any(s > b for s, b in zip(shape, buf.shape[1:])):
                # wider rows than stored so far (e.g. logits after the head grew): zero-pad the buffer
                grown = torch.zeros((self.capacity,) + tuple(max(s, b) for s, b in zip(shape, buf.shape[1:])),
                                    dtype=buf.dtype)
                grown[(slice(None),) + tuple(slice(0, b) for b in buf.shape[1:])] = buf
                self.extras[k] = grown
        for i in range(len(labels)):
            slot = self.seen if self.seen < self.capacity else int(torch.randint(0, self.seen + 1, (1,), generator=generator))
            self.seen += 1
            if slot < self.capacity:
                self.images[slot] = images[i]
                self.labels[slot] = labels[i]
                for k, v in extras.items():
                    buf = self.extras[k]
                    row = v[i].detach().cpu()
                    buf[slot].zero_()
                    buf[slot][tuple(slice(0, s) for s in row.shape)] = row
        return None

    def sample(self, n: int, generator: Optional[torch.Generator] = None):
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.extras.items()}

    @property
    def nbytes(self) -> int:
        if self.images is None:
            return 0
        per_slot = self.images[0].numel() * self.images.element_size()
        per_slot += sum(v[0].numel() * v.element_size() for v in self.extras.values())
        return len(self) * per_slot

    def state_dict(self) -> dict:
        """The filled slots and the stream count (checkpoints hold no empty slots)."""
        n = len(self)
        return {"capacity": self.capacity, "seen": self.seen,
                "images": None if self.images is None else self.images[:n].clone(),
                "labels": None if self.labels is None else self.labels[:n].clone(),
                "extras": {k: v[:n].clone() for k, v in self.extras.items()}}

    def load_state_dict(self, state: dict) -> None:
        def full(stored: torch.Tensor) -> torch.Tensor:
            buf = torch.zeros((self.capacity,) + tuple(stored.shape[1:]), dtype=stored.dtype)
            buf[: len(stored)] = stored
            return buf

        self.capacity, self.seen = int(state["capacity"]), int(state["seen"])
        self.images = None if state["images"] is None else full(state["images"])
        self.labels = None if state["labels"] is None else full(state["labels"])
        self.extras = {k: full(v) for k, v in state["extras"].items()}
