"""ImageSet: images + integer labels, held in memory as uint8 tensors or decoded lazily from files.

Keeping decoded uint8 tensors in memory means 2 CPU cores are spent on training, not on decoding
JPEGs every epoch; file-backed sets exist for datasets too large for memory.
"""
from __future__ import annotations

import io
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from dynammo.errors import UserError

Source = Union[str, bytes, tuple]  # a file path, encoded bytes, or (name, bytes) from an archive

# The largest image (width x height) opened: config key max_image_pixels, set for the process by
# set_max_image_pixels when a dataset is loaded (DataLoader workers inherit it). The default is
# Pillow's own refusal threshold (twice the limit it warns at).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: Optional[int]) -> None:
    global _max_image_pixels
    _max_image_pixels = int(limit or DEFAULT_MAX_IMAGE_PIXELS)
    if Image.MAX_IMAGE_PIXELS is not None and _max_image_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = _max_image_pixels  # Pillow refuses above twice this: ours comes first


def source_name(src: Source) -> str:
    return src[0] if isinstance(src, tuple) else (src if isinstance(src, str) else "<bytes>")


def too_large(name: str, pixels: Optional[int]) -> UserError:
    many = f"{pixels} pixels" if pixels else "more pixels than Pillow opens"
    fix = f"max_image_pixels={pixels}" if pixels else "max_image_pixels=N above its width x height"
    return UserError(f"image {name} has {many}, more than max_image_pixels={_max_image_pixels} (a guard against "
                     f"decompression bombs); if the image is genuine, raise the limit: {fix}")


@contextmanager
def open_image(src: Source):
    """The opened (header read, not decoded) PIL image of a source; an unreadable file or one of more
    than max_image_pixels pixels is one UserError line naming the file (and the key)."""
    name, data = source_name(src), (src[1] if isinstance(src, tuple) else src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below, in one line
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past ours: its message has the size
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_large(name, int(found.group(1)) if found else None) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"image {name} cannot be read ({exc.__class__.__name__}); remove or replace the file") from None
    with img:
        pixels = img.size[0] * img.size[1]
        if pixels > _max_image_pixels:
            raise too_large(name, pixels)
        yield img


def decode_image(src: Source, channels: int, size: Optional[int]) -> torch.Tensor:
    """Decode one image to a uint8 tensor (C, H, W), resized to size x size when given."""
    name = source_name(src)
    try:
        with open_image(src) as img:
            mode = "L" if channels == 1 else "RGB"
            if size is not None and img.format == "JPEG":
                # decode at the smallest 1/2, 1/4 or 1/8 scale still >= size x size: a 1024 px ISIC
                # photo resized to 224 px needs 1/16 of the decoding work, at a resize's precision
                img.draft(mode, (size, size))
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.array(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"image {name} cannot be read ({exc.__class__.__name__}); remove or replace the file") from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def source_aspect(src: Source) -> float:
    """Height / width of an encoded image, from its header (nothing decoded)."""
    with open_image(src) as img:  # the same pixel guard and one-line errors as decoding
        w, h = img.size
    return h / w


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) tensor, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    # chunks of at most ~256 MB of float output (and at most 4096 images), whatever the size
    per_image = max(1, images.shape[1] * size * size * 4)
    for chunk in images.split(max(1, min(4096, 2**28 // per_image))):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


@dataclass
class ImageSet:
    """labels: int64 (N,). Exactly one of `images` (uint8 N,C,H,W) or `sources` (lazy files) is set.

    aspect: float32 (N,), each image's height / width before it was resized to a square (None: the
    images are as they were taken, or square). Random-resized and centre crops are drawn on the
    original geometry from it (data/transforms.py), so a square image store keeps the aspect ratio
    the papers' transforms see."""

    labels: torch.Tensor
    images: Optional[torch.Tensor] = None
    sources: Optional[List[Source]] = None
    channels: int = 3
    size: Optional[int] = None
    aspect: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.images is not None:
            self.channels = int(self.images.shape[1])
            self.size = int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(idx, dtype=torch.long)
        aspect = None if self.aspect is None else self.aspect[idx]
        if self.in_memory:
            return ImageSet(self.labels[idx], images=self.images[idx], aspect=aspect)
        return ImageSet(self.labels[idx], sources=[self.sources[i] for i in idx.tolist()],
                        channels=self.channels, size=self.size, aspect=aspect)

    def aspect_of(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """The original height / width of the images at idx (None when not recorded)."""
        return None if self.aspect is None else self.aspect[idx]

    def with_aspect(self) -> "ImageSet":
        """The same images with their original aspect ratios recorded: read from the files' headers
        (before resizing), or the stored images' own shape."""
        if self.in_memory:
            ratio = self.images.shape[-2] / self.images.shape[-1]
            aspect = torch.full((len(self),), ratio, dtype=torch.float32)
        else:
            aspect = torch.tensor([source_aspect(s) for s in self.sources], dtype=torch.float32)
        return self._replace(aspect=aspect)

    def _replace(self, **changes) -> "ImageSet":
        fields = dict(labels=self.labels, images=self.images, sources=self.sources, channels=self.channels,
                      size=self.size, aspect=self.aspect)
        fields.update(changes)
        if fields["images"] is not None:
            fields["sources"] = None
        return ImageSet(**fields)

    def of_classes(self, classes: Sequence[int]) -> "ImageSet":
        mask = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return self.subset(mask.nonzero().flatten())

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 batch (B, C, H, W) for the given indices."""
        if self.in_memory:
            return self.images[idx]
        return torch.stack([self.decode(i) for i in idx.tolist()])

    def decode(self, i: int) -> torch.Tensor:
        return decode_image(self.sources[i], self.channels, self.size)

    def materialize(self) -> "ImageSet":
        """Decode every file into memory."""
        if self.in_memory:
            return self
        if len(self) == 0:
            raise UserError("an image set is empty; check the dataset folder")
        imgs = [self.decode(i) for i in range(len(self))]
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) > 1:
            raise UserError(f"images have different sizes {sorted(shapes)[:3]}...; set img_size=N to resize them")
        return ImageSet(self.labels.clone(), images=torch.stack(imgs), aspect=self.aspect)

    def nbytes_per_image(self) -> int:
        if self.in_memory:
            return int(self.images[0].numel()) if len(self) else 0
        side = self.size or 0
        return self.channels * side * side

    def with_labels(self, labels: torch.Tensor) -> "ImageSet":
        return self._replace(labels=labels)

    def to_channels(self, channels: int) -> "ImageSet":
        if self.channels == channels:
            return self
        if not self.in_memory:
            return self._replace(channels=channels)
        if self.channels == 1 and channels == 3:
            return self._replace(images=self.images.expand(-1, 3, -1, -1).contiguous())
        raise UserError(f"cannot convert {self.channels}-channel images to {channels} channels")

    def resized(self, size: int) -> "ImageSet":
        if self.in_memory:
            return self._replace(images=resize_uint8(self.images, size))
        return self._replace(size=size)

    @staticmethod
    def concat(sets: Sequence["ImageSet"]) -> "ImageSet":
        sets = [s for s in sets if s is not None and len(s) > 0]
        if not sets:
            return ImageSet(torch.zeros(0, dtype=torch.long), images=torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
        if len(sets) == 1:
            return sets[0]
        aspect = None  # a set without recorded ratios holds images as taken: their own shape's ratio
        if any(s.aspect is not None for s in sets):
            aspect = torch.cat([s.aspect if s.aspect is not None else s.with_aspect().aspect for s in sets])
        if all(s.in_memory for s in sets):
            return ImageSet(torch.cat([s.labels for s in sets]), images=torch.cat([s.images for s in sets]),
                            aspect=aspect)
        if any(s.in_memory for s in sets):
            raise ValueError("cannot mix in-memory and file-backed image sets")
        sources = [x for s in sets for x in s.sources]
        return ImageSet(torch.cat([s.labels for s in sets]), sources=sources, channels=sets[0].channels,
                        size=sets[0].size, aspect=aspect)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Seeded stratified split -> (train_idx, test_idx), both sorted. Each class keeps >= 1 train image."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1 if test_fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def subsample_per_class(labels: torch.Tensor, max_per_class: Optional[int], seed: int) -> torch.Tensor:
    """Seeded subset of indices with at most max_per_class of each class (order kept)."""
    if max_per_class is None:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) > max_per_class:
            idx = idx[torch.randperm(len(idx), generator=g)[:max_per_class]]
        keep.append(idx)
    return torch.sort(torch.cat(keep)).values
