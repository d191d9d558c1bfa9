"""Random resized crops and flips of a whole batch in one affine resampling: the training
augmentation of the continual runs (data/transforms.py) and the views of self-supervised
pretraining (pretrain/augment.py) both draw their boxes here."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def crop_boxes(n: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float], generator,
               tries: int = 10, aspect: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, 4) float64 boxes (top, left, height, width) in pixels, as torchvision's RandomResizedCrop
    draws them: area share and log-aspect uniform, the first of `tries` draws that fits, else the
    centred largest box whose ratio is in range (the whole image when its own ratio is); the position
    uniform over where the box fits.

    aspect: (n,) each image's original height / width when it is stored resized to h x w: the box is
    drawn on the original image (its area share and width / height ratio there) and mapped onto the
    stored one, where an axis-aligned resize keeps the area share and multiplies the ratio by it."""
    area = h * w
    s = torch.rand(n, tries, generator=generator, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(torch.rand(n, tries, generator=generator, dtype=torch.float64) * (hi - lo) + lo)
    # the original height / width (the stored image's own unless given)
    a = torch.full((n,), h / w, dtype=torch.float64) if aspect is None else aspect.to(torch.float64).view(n)
    r = r * (a.view(n, 1) * w / h)
    cw = torch.round(torch.sqrt(s * area * r))
    ch = torch.round(torch.sqrt(s * area / r))
    ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
    first = ok.to(torch.int64).argmax(dim=1)
    rows = torch.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    none = ~ok.any(dim=1)
    # torchvision's fallback: the original's width / height clamped into the ratio range, as shares
    own = 1 / a
    share_w = torch.where(own > ratio[1], a * ratio[1], torch.ones_like(a))
    share_h = torch.where(own < ratio[0], 1 / (a * ratio[0]), torch.ones_like(a))
    cw = torch.where(none, torch.round(share_w * w), cw)
    ch = torch.where(none, torch.round(share_h * h), ch)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (h - ch + 1)).clamp(max=h - ch)
    left = torch.floor(u[:, 1] * (w - cw + 1)).clamp(max=w - cw)
    top = torch.where(none, torch.floor((h - ch) / 2), top)
    left = torch.where(none, torch.floor((w - cw) / 2), left)
    return torch.stack([top, left, ch, cw], dim=1)


def crop_flip_resize(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each image's box resampled (bilinear) to the full H x W, mirrored where flips is True:
    one affine grid for the batch."""
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.t()
    sx = cw / w
    sy = ch / h
    cx = (2 * left + cw) / w - 1  # the box centre in normalised coordinates (align_corners=False)
    cy = (2 * top + ch) / h - 1
    sx = torch.where(flips, -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
