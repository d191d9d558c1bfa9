"""The two random views of self-supervised pretraining, made on a whole uint8 batch on its device.

Every random number is drawn on the CPU from the generator passed in (the engine's), so a run is
reproducible and an interrupted one resumes with the same views; the pixel work (one affine
resampling for crop + flip, per-image colour factors, one grouped convolution for the blur) runs
where the batch is.

`natural` is the augmentation of SimSiam (Chen & He, CVPR 2021, sec. 4) and MoCo-v2 (Chen et al.,
arXiv 2003.04297, "aug+"), in this order: random resized crop (area share in [0.2, 1], aspect
ratio in [3/4, 4/3]), colour jitter with probability 0.8 (brightness, contrast, saturation 0.4, hue
0.1; the four in one random order per batch), grayscale with probability 0.2, Gaussian blur with
probability 0.5 (sigma in [0.1, 2.0] pixels at 224 px, scaled with the image side), horizontal
flip with probability 0.5. On a one-channel image saturation, hue and grayscale have nothing to do.

`medical`: crop (area share in [0.4, 1]), flip, blur as above, and a small intensity jitter
(brightness and contrast 0.2, probability 0.8): no colour jitter or grayscale, which mean nothing
for a grayscale scan. Flips are left out where the dataset says a mirrored image is another image
(`flip=False`, e.g. digits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dynammo.data.crops import crop_boxes, crop_flip_resize

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's grayscale


@dataclass(frozen=True)
class AugmentSpec:
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)  # in pixels at 224 px


def preset(name: str, flip: bool = True, crop_min: Optional[float] = None) -> AugmentSpec:
    if name == "natural":
        spec = AugmentSpec(flip=flip)
    elif name == "medical":
        spec = AugmentSpec(crop_scale=(0.4, 1.0), flip=flip, brightness=0.2, contrast=0.2, saturation=0.0, hue=0.0,
                           gray_p=0.0)
    else:
        raise ValueError(f"unknown augmentation preset {name}")
    if crop_min is not None:
        spec = AugmentSpec(**{**spec.__dict__, "crop_scale": (crop_min, 1.0)})
    return spec


def _uniform(n: int, lo: float, hi: float, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luminance of (B, 3, H, W) RGB in [0, 1] (one channel passes through)."""
    if x.shape[1] == 1:
        return x
    wts = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * wts).sum(dim=1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=1)
    h6 = torch.remainder(h, 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, dim=1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], dim=1)  # (B,6,3,H,W)
    idx = i.unsqueeze(1).unsqueeze(2).expand(-1, 1, 3, -1, -1)
    return table.gather(1, idx).squeeze(1)


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def colour_jitter(x: torch.Tensor, spec: AugmentSpec, generator) -> torch.Tensor:
    """torchvision's ColorJitter with one factor per image, applied with probability jitter_p."""
    b = x.shape[0]
    apply = torch.rand(b, generator=generator) < spec.jitter_p
    ops = []
    if spec.brightness:
        ops.append(("brightness", _uniform(b, max(0.0, 1 - spec.brightness), 1 + spec.brightness, generator)))
    if spec.contrast:
        ops.append(("contrast", _uniform(b, max(0.0, 1 - spec.contrast), 1 + spec.contrast, generator)))
    if spec.saturation and x.shape[1] == 3:
        ops.append(("saturation", _uniform(b, max(0.0, 1 - spec.saturation), 1 + spec.saturation, generator)))
    if spec.hue and x.shape[1] == 3:
        ops.append(("hue", _uniform(b, -spec.hue, spec.hue, generator)))
    if not ops:
        return x
    order = torch.randperm(len(ops), generator=generator).tolist()
    out = x
    for j in order:
        name, factor = ops[j]
        f = _per_image(factor, x)
        if name == "brightness":
            out = (out * f).clamp(0, 1)
        elif name == "contrast":
            mean = grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * f + mean).clamp(0, 1)
        elif name == "saturation":
            gray = grayscale(out)
            out = ((out - gray) * f + gray).clamp(0, 1)
        else:  # hue: a rotation of the HSV hue
            hsv = rgb_to_hsv(out)
            hsv = torch.cat([torch.remainder(hsv[:, :1] + f, 1.0), hsv[:, 1:]], dim=1)
            out = hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(_per_image(apply, x).bool(), out, x)


def random_grayscale(x: torch.Tensor, p: float, generator) -> torch.Tensor:
    if x.shape[1] != 3 or p <= 0:
        return x
    apply = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(_per_image(apply, x).bool(), grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per image, reflect padding; one grouped
    convolution per direction for the whole batch."""
    b, c, h, w = x.shape
    radius = int(min(math.ceil(3 * float(sigma.max())), (min(h, w) - 1) // 2))
    if radius < 1:
        return x
    offs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (offs.view(1, -1) / sigma.view(-1, 1).to(torch.float64)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).to(device=x.device, dtype=x.dtype)  # (B, 2r+1)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def random_blur(x: torch.Tensor, spec: AugmentSpec, generator) -> torch.Tensor:
    b = x.shape[0]
    apply = torch.rand(b, generator=generator) < spec.blur_p
    side = min(x.shape[-2:])
    sigma = _uniform(b, *spec.blur_sigma, generator) * (side / 224.0)
    if spec.blur_p <= 0 or not bool(apply.any()):
        return x
    return torch.where(_per_image(apply, x).bool(), gaussian_blur(x, sigma), x)


class TwoViews:
    """uint8 (B, C, H, W) -> a normalised float view (B, 3, H, W) per call, as the engine's test
    transform normalises (grayscale repeated to 3 channels)."""

    def __init__(self, spec: AugmentSpec, mean: Sequence[float], std: Sequence[float], channels_last: bool = False):
        self.spec = spec
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def view(self, raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spec = self.spec
        with torch.autocast(raw.device.type, enabled=False):
            x = raw.to(torch.float32).div_(255.0)
            b, _, h, w = x.shape
            boxes = crop_boxes(b, h, w, spec.crop_scale, spec.crop_ratio, generator)
            flips = (torch.rand(b, generator=generator) < 0.5) & spec.flip
            x = crop_flip_resize(x, boxes, flips).clamp_(0, 1)
            x = colour_jitter(x, spec, generator)
            x = random_grayscale(x, spec.gray_p, generator)
            x = random_blur(x, spec, generator)
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x

    def __call__(self, raw: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view(raw, generator), self.view(raw, generator)
