"""What the engine hands a stage's loss (`Batch`) and what it sums over an epoch (`EpochSums`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from dynammo.distributed import World


@dataclass
class Batch:
    x: torch.Tensor  # transformed float images on the device
    y: torch.Tensor  # labels on the device
    raw: torch.Tensor  # the uint8 images (before augmentation), on the device
    index: torch.Tensor  # indices into the ImageSet being trained on
    # the labels of the whole global batch when this process trains on a slice of it (a distributed
    # run); a loss that depends on the batch as a whole (ACL's which-heads-count test) reads it
    global_y: Optional[torch.Tensor] = None

    @property
    def batch_labels(self) -> torch.Tensor:
        return self.y if self.global_y is None else self.global_y

    def subset_mean(self, local_mean: torch.Tensor, local_count: int, global_count: int) -> torch.Tensor:
        """A loss term that averages over a subset of the batch (UCIR's old-class samples), taken
        on this slice: rescaled so that the engine's slice-size weighting of the gradients gives
        the whole batch's mean (unchanged on one process)."""
        if self.global_y is None or local_count == 0:
            return local_mean
        return local_mean * (local_count * len(self.global_y) / (global_count * len(self.y)))


class EpochSums:
    """The running loss and accuracy of an epoch, kept on the device (no host sync per batch)."""

    def __init__(self, device: torch.device, saved: Optional[tuple] = None):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = self.counted = 0
        if saved is not None:
            self.loss += saved[0]
            self.correct += saved[1]
            self.seen, self.counted = saved[2], saved[3]

    def add(self, loss: torch.Tensor, n: int, logits: Optional[torch.Tensor], target: Optional[torch.Tensor]) -> None:
        self.loss += loss.detach() * n
        self.seen += n
        if logits is not None:
            self.correct += (logits.detach().argmax(1) == target).sum()
            self.counted += len(target)

    def state(self) -> tuple:
        return self.loss.cpu(), self.correct.cpu(), self.seen, self.counted

    def totals(self, world: World) -> Tuple[float, Optional[float]]:
        """(mean loss, accuracy % or None) over the epoch's global batches."""
        t = torch.stack([self.loss.double().cpu(), self.correct.double().cpu(),
                         torch.tensor(float(self.seen), dtype=torch.float64),
                         torch.tensor(float(self.counted), dtype=torch.float64)])
        if world.distributed:
            t = world.sum_(t.to(world.device())).cpu()
        loss, correct, seen, counted = t.tolist()
        return loss / max(seen, 1), (100.0 * correct / counted if counted else None)



# A step's loss: returns (loss, logits for the running accuracy or None, targets for it or None)
LossFn = Callable[[Batch], Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]
