"""Batches of (uint8 images, labels) from an ImageSet: tensor slicing when in memory, a
DataLoader with workers when decoding files."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError


class _FileDataset(Dataset):
    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images.decode(i), self.images.labels[i]


def epoch_order(n: int, shuffle: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def iterate_batches(data: ImageSet, batch_size: int, shuffle: bool = False,
                    generator: Optional[torch.Generator] = None, num_workers: int = 0,
                    drop_last: bool = False, order: Optional[torch.Tensor] = None,
                    start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields (uint8 images, labels, indices into `data`). `order` (an epoch's sample order, drawn
    here when not given) and `start_batch` let an interrupted epoch continue where it stopped."""
    n = len(data)
    if order is None:
        order = epoch_order(n, shuffle, generator)
    if drop_last and n > batch_size:
        order = order[: n - n % batch_size]
    order = order[start_batch * batch_size:]
    if data.in_memory:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield data.images[idx], data.labels[idx], idx
        return
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    # its own generator: the worker seed must not be drawn from torch's global RNG, or the
    # sequence a resumed run draws would differ from an uninterrupted one
    loader = DataLoader(_FileDataset(data), batch_sampler=[b.tolist() for b in batches], num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    try:
        for idx, (x, y) in zip(batches, loader):
            yield x, y, idx
    except UserError as exc:  # a worker's error comes back wrapped in its traceback: keep its one line
        raise UserError(worker_message(str(exc))) from None


def worker_message(text: str) -> str:
    """The UserError line of a DataLoader worker's re-raised traceback (the text itself if none)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    prefix = f"{UserError.__module__}.{UserError.__name__}: "
    return next((line[len(prefix):] for line in reversed(lines) if line.startswith(prefix)), lines[-1] if lines else text)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    if drop_last and n > batch_size:
        return n // batch_size
    return (n + batch_size - 1) // batch_size
