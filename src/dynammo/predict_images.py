"""The images `dynammo predict` classifies: read within a pixel limit, and compared with what the
model was trained on (its input size and channels, from the export's dynammo.json)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from dynammo.data.imageset import decode_image
from dynammo.errors import UserError

PIXELS_FLAG = "--max-image-pixels"
# An image whose side is this many times larger or smaller than the model's input is far from what
# it was trained on: the digits model (16 px) shown MedNIST scans (64 px) is the case this catches.
FAR_SIZE_FACTOR = 4.0


@contextmanager
def pixel_limit(max_pixels: Optional[int]):
    """PIL's decompression-bomb limit set to max_pixels while images are read (PIL warns between it and
    twice it, and raises above; here every image over it is refused before decoding)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def default_max_pixels() -> int:
    return int(Image.MAX_IMAGE_PIXELS or 0) or 2**31


def too_large(path, size_text: str, max_pixels: int) -> UserError:
    return UserError(f"image {path} is {size_text}, over the limit of {max_pixels:,} pixels that guards against "
                     f"decompression bombs; if the file is trusted, raise the limit with {PIXELS_FLAG} N")


class TrainingMismatch:
    """Images unlike the model's training inputs, counted over a run and said in one line."""

    def __init__(self, input_shape: Sequence[int]):
        self.channels, self.height, self.width = input_shape
        self.total = 0
        self.far: List[str] = []  # 'name (WxH)'
        self.colour_into_gray: List[str] = []
        self.gray_into_colour: List[str] = []

    def add(self, path: Path, width: int, height: int, colour: bool) -> None:
        self.total += 1
        factor = math.sqrt(width * height / (self.width * self.height))
        if factor >= FAR_SIZE_FACTOR or factor <= 1 / FAR_SIZE_FACTOR:
            self.far.append(f"{path.name} is {width}x{height}")
        if colour and self.channels == 1:
            self.colour_into_gray.append(path.name)
        if not colour and self.channels == 3:
            self.gray_into_colour.append(path.name)

    def line(self) -> Optional[str]:
        parts = []
        if self.far:
            parts.append(f"{len(self.far)} far from the model's {self.width}x{self.height} input size (e.g. {self.far[0]})")
        if self.colour_into_gray:
            parts.append(f"{len(self.colour_into_gray)} in colour, the model was trained on grayscale "
                         f"(e.g. {self.colour_into_gray[0]})")
        if self.gray_into_colour:
            parts.append(f"{len(self.gray_into_colour)} grayscale, the model was trained on colour "
                         f"(e.g. {self.gray_into_colour[0]})")
        if not parts:
            return None
        return (f"note: of {self.total} images, {'; '.join(parts)}: predictions for images unlike the training "
                "images mean little (predicted anyway)")


def header(path: Path):
    """(width, height, PIL mode) from the file's header; nothing is decoded (so no limit is needed yet:
    the size is compared with it before decoding)."""
    try:
        with pixel_limit(None), Image.open(path) as img:
            return img.size[0], img.size[1], img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"image {path} cannot be read ({exc.__class__.__name__}); remove or replace the file") from None


def is_colour(rgb: torch.Tensor) -> bool:
    return not (torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2]))


def read_image(path: Path, input_shape: Sequence[int], max_pixels: int, seen: TrainingMismatch) -> torch.Tensor:
    """uint8 (1, C, H, W) at the model's input size, decoded and resized as a run loads image files
    (decode_image: PIL bilinear to a square side, a JPEG drafted first), so an image of the run's own
    data set gets the pixels evaluation saw."""
    c, h, w = input_shape
    width, height, mode = header(path)
    if width * height > max_pixels:
        raise too_large(path, f"{width}x{height} = {width * height:,} pixels", max_pixels)
    img = decode_image(str(path), c, h if h == w else None)
    many_bands = Image.getmodebands(mode) >= 3 or mode == "P"  # a palette may hold colours
    rgb = img if c == 3 else (decode_image(str(path), 3, None) if many_bands else None)
    seen.add(path, width, height, colour=rgb is not None and is_colour(rgb))
    img = img.unsqueeze(0)
    if img.shape[-2:] != (h, w):  # a model of non-square input: the image must have its size
        raise UserError(f"image {path} is {img.shape[-1]}x{img.shape[-2]} but the model takes {w}x{h}; resize it")
    return img
