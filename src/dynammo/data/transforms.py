"""Batch transforms on uint8 tensors, on the training device.

Augmenting a whole batch at once (one gather for the random crops, one `where` for the flips)
costs a small fraction of a training step, so augmentation never becomes the bottleneck the
per-image PIL pipelines of other frameworks are on 2 CPU cores.

Two training crops (config `augment_crop`): `pad` zero-pads by 1/8 of the side and crops back at a
random offset (the CIFAR recipe of the ResNet papers); `resized` is torchvision's RandomResizedCrop
(area share in [0.08, 1], width / height in [3/4, 4/3], resampled to the full side) with the flip in
the same resampling: the training transform of L2P, DualPrompt and CODA-Prompt's official code.
Two test views (`test_crop`): `none`, the stored image, and `center`, Resize(side·256/224) +
CenterCrop(side) of L2P/DualPrompt's code (the central 224/256 of the shorter side). Where the
images are stored squashed to a square, their recorded original aspect ratio (ImageSet.aspect,
config `keep_aspect`) places both crops where they fall on the original image. Resampling is
bilinear from the stored image (the references resample the original file, bicubic at test).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from dynammo.data.crops import crop_boxes, crop_flip_resize

RESIZED_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as the prompt methods' code
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
CENTER_CROP_RESIZE = 256 / 224  # Resize(256) + CenterCrop(224), scaled to the image side


class BatchTransform:
    """uint8 (B, C, H, W) -> normalised float (B, 3, H, W); random crop + flip when training.

    Grayscale images are repeated to 3 channels so one backbone (and ImageNet weights) fits all.
    channels_last: the output is in NHWC layout (the engine's compute path, compute.py, sets it);
    a convolution on a channels-last input runs channels-last kernels and passes the layout on.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], train: bool = False, crop_padding: int = 0,
                 flip: bool = False, out_channels: int = 3, channels_last: bool = False,
                 resized_crop: bool = False, center_crop: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.train = train
        self.resized_crop = resized_crop and train
        self.center_crop = center_crop and not train
        self.pad = crop_padding if train and not self.resized_crop else 0
        self.flip = flip and train
        self.out_channels = out_channels
        self.channels_last = channels_last
        self._on_device: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def stats_on(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on `device`, copied there once: a copy per batch is a host sync on a GPU."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                 aspect: Optional[torch.Tensor] = None) -> torch.Tensor:
        """aspect: each image's original height / width (ImageSet.aspect_of), None for as stored."""
        if self.resized_crop or self.center_crop:
            x = self._resample(x, generator, aspect)
        else:
            if self.pad:
                x = random_crop(x, self.pad, generator)
            if self.flip:
                flip = torch.rand(x.shape[0], device="cpu", generator=generator).to(x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        mean, std = self.stats_on(x.device)
        x = (x.to(torch.get_default_dtype()).div_(255.0) - mean).div_(std)  # float32 unless a test asks for float64
        if x.shape[1] == 1 and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.channels_last:  # one copy, which the expanded grayscale batch needs anyway
            x = x.contiguous(memory_format=torch.channels_last)
        return x


    def _resample(self, x: torch.Tensor, generator: Optional[torch.Generator],
                  aspect: Optional[torch.Tensor]) -> torch.Tensor:
        """The random resized crop (+ flip) or the centre crop, one affine resampling for the batch
        (pixel values stay in [0, 255]; rounded back to uint8 levels as a PIL pipeline's are)."""
        b, _, h, w = x.shape
        if not self.resized_crop:
            return center_view(x.to(torch.get_default_dtype()), aspect)
        boxes = crop_boxes(b, h, w, RESIZED_CROP_SCALE, RESIZED_CROP_RATIO, generator, aspect=aspect)
        flips = (torch.rand(b, generator=generator) < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool)
        out = crop_flip_resize(x.to(torch.get_default_dtype()), boxes, flips)
        return out.round_().clamp_(0, 255)


def center_view(x: torch.Tensor, aspect: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `center` test view of float pixel values in [0, 255] (B, C, H, W): one resampling of the
    centre box, rounded to uint8 levels. `dynammo export` traces this same function into the model."""
    b, _, h, w = x.shape
    out = crop_flip_resize(x, center_boxes(b, h, w, aspect), torch.zeros(b, dtype=torch.bool))
    return out.round().clamp(0, 255)


def center_boxes(n: int, h: int, w: int, aspect: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, 4) float64 boxes (top, left, height, width) of Resize(s·256/224) + CenterCrop(s) on an
    h x w image: a square of 224/256 of the original image's shorter side, at its centre, mapped onto
    the stored image (aspect: the original height / width; None: as stored)."""
    side = min(h, w)
    frac = side / int(CENTER_CROP_RESIZE * side)  # DualPrompt's int((256 / 224) * input_size)
    a = torch.full((n,), h / w, dtype=torch.float64) if aspect is None else aspect.to(torch.float64).view(n)
    # the square's side, as shares of the original height and width
    share_h = frac * torch.clamp(1 / a, max=1.0)
    share_w = frac * torch.clamp(a, max=1.0)
    ch, cw = share_h * h, share_w * w
    return torch.stack([(h - ch) / 2, (w - cw) / 2, ch, cw], dim=1)


def random_crop(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None,
                per_image: Optional[bool] = None) -> torch.Tensor:
    """Zero-pad by `pad` then crop back to H x W at a random offset per image (one gather on an
    accelerator, one slice copy per image on the CPU)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    if x.device.type == "cpu" if per_image is None else per_image:  # ~20x faster than the gather on CPU, same values
        out = torch.empty_like(x)
        for i, (r, col) in enumerate(off.t().tolist()):
            out[i] = padded[i, :, r:r + h, col:col + w]
        return out
    off = off.to(x.device)
    rows = (off[0].view(b, 1) + torch.arange(h, device=x.device).view(1, h))  # (B, H)
    cols = (off[1].view(b, 1) + torch.arange(w, device=x.device).view(1, w))  # (B, W)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def make_transforms(data, augment: bool, channels_last: bool = False, augment_crop: str = "pad",
                    test_crop: str = "none"):
    """(train, test) transforms for a LoadedData: crop padding is 1/8 of the image side (augment_crop
    pad) or a random resized crop (resized); the test view is the stored image (test_crop none) or
    its centre crop (center)."""
    side = data.train.size or 32
    resized = augment and augment_crop == "resized"
    train = BatchTransform(data.mean, data.std, train=augment, crop_padding=max(1, side // 8) if augment else 0,
                           flip=data.flip and augment, channels_last=channels_last, resized_crop=resized)
    test = BatchTransform(data.mean, data.std, train=False, channels_last=channels_last,
                          center_crop=test_crop == "center")
    return train, test
