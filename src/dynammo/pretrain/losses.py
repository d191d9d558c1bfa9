"""The self-supervised losses and MoCo's two pieces of state, as plain functions on tensors.

- SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): the
  symmetrised negative cosine similarity between one view's prediction p and the other view's
  projection z, with a stop-gradient on z: L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,
  D(p, z) = -<p/|p|, z/|z|> averaged over the batch (eq. 1-4 of the paper).
- MoCo-v2 (Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning", arXiv
  2003.04297, on MoCo: He et al., CVPR 2020): InfoNCE over one positive key and the K negatives of a
  queue, logits / temperature, the positive at index 0 (eq. 1 of MoCo); the key encoder is a
  moving average of the query encoder, theta_k <- m theta_k + (1 - m) theta_q (eq. 2); the queue
  is first in, first out: the batch's keys replace the oldest ones.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_gradient: bool = True) -> torch.Tensor:
    """D(p, z) = -mean over the batch of cos(p_i, z_i); z is detached (no gradient reaches the
    target branch) unless stop_gradient=False (the paper's collapsing ablation)."""
    if stop_gradient:
        z = z.detach()
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 stop_gradient: bool = True) -> torch.Tensor:
    """The symmetrised SimSiam loss, in [-1, 1] (-1: every prediction points at the other view)."""
    return 0.5 * negative_cosine(p1, z2, stop_gradient) + 0.5 * negative_cosine(p2, z1, stop_gradient)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, 1 + K) logits: column 0 is q_i . k_i (the positive), then q_i . queue_j; all / temperature.
    q and k are (B, D) and l2-normalised, queue is (K, D); k and the queue carry no gradient."""
    pos = (q * k.detach()).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().t()
    return torch.cat([pos, neg], dim=1) / temperature


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): the cross-entropy of picking the positive among 1 + K candidates."""
    logits = info_nce_logits(q, k, queue, temperature)
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits


@torch.no_grad()
def momentum_update_(key: nn.Module, query: nn.Module, m: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter (buffers, e.g. BatchNorm
    statistics, stay the key encoder's own, as its forward passes in training mode keep them)."""
    for pk, pq in zip(_params(key), _params(query)):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)


def _params(module: nn.Module) -> Iterable[torch.Tensor]:
    return [p for _, p in sorted(module.named_parameters(), key=lambda t: t[0])]


class KeyQueue(nn.Module):
    """MoCo's dictionary: K l2-normalised keys (a buffer, K x D) and the position of the oldest one.
    `push(keys)` overwrites the oldest len(keys) entries (wrapping round), so the queue always
    holds the K most recent keys."""

    def __init__(self, size: int, dim: int, generator: torch.Generator):
        super().__init__()
        # random unit vectors until real keys replace them (MoCo starts from a random queue too)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        n = len(keys)
        if n > self.size:  # only the newest K fit
            keys, n = keys[-self.size:], self.size
        start = int(self.ptr)
        idx = (torch.arange(n, device=self.keys.device) + start) % self.size
        self.keys[idx] = keys.detach().to(self.keys.dtype)
        self.ptr.fill_((start + n) % self.size)

    def oldest_first(self) -> torch.Tensor:
        """The keys from the oldest to the newest (for tests and inspection)."""
        start = int(self.ptr)
        return torch.cat([self.keys[start:], self.keys[:start]])
