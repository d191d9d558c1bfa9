"""Folder-per-class image trees (torchvision ImageFolder layout): the user's own data.

`data_root/<class>/<image>` (seeded stratified split), or `data_root/train/<class>/...` plus
`data_root/test/<class>/...` (the split is kept). Class ids come from sorted folder names.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from dynammo.data.datasets import RawDataset, dataset
from dynammo.data.imageset import ImageSet, stratified_split
from dynammo.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scan_class_folders(root: Path) -> Tuple[List[str], List[str], np.ndarray]:
    """-> (sorted class names, image paths, labels). Empty class folders are an error."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; set data_root to the folder holding one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"dataset folder {root} holds no class sub-folders; expected {root}/<class>/<image>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.is_file() and is_image(p.name))
        if not files:
            raise UserError(f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def guess_channels(paths, n: int = 16) -> int:
    """1 if the first images are all single-channel, else 3."""
    from PIL import Image

    for p in list(paths)[:n]:
        src = p[1] if isinstance(p, tuple) else p
        try:
            import io

            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
                if img.mode not in ("L", "I", "I;16", "1", "F"):
                    return 3
        except OSError as exc:
            name = p[0] if isinstance(p, tuple) else p
            raise UserError(f"image {name} cannot be read ({exc}); remove or replace the file") from exc
    return 1


def split_sources(name, class_names, sources, labels, cfg, seed, flip=True) -> RawDataset:
    """A dataset without an official split: seeded stratified split of lazily decoded sources."""
    channels = guess_channels(sources)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, seed)
    mk = lambda idx: ImageSet(labels[idx], sources=[sources[i] for i in idx], channels=channels, size=cfg.img_size)
    return RawDataset(name, class_names, mk(train_idx), mk(test_idx), flip=flip,
                      split=f"seeded stratified split, test_fraction {cfg.test_fraction}, seed {seed}")


@dataset("folder", "data_root/<class>/<image>, or data_root/{train,test}/<class>/<image>", aliases=("imagefolder",))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, train_paths, train_labels = scan_class_folders(root / "train")
        test_classes, test_paths, test_labels = scan_class_folders(root / "test")
        if test_classes != classes:
            raise UserError(f"{root}/train and {root}/test have different class folders; make them the same")
        channels = guess_channels(train_paths)
        mk = lambda p, l: ImageSet(l, sources=p, channels=channels, size=cfg.img_size)
        return RawDataset("folder", classes, mk(train_paths, train_labels), mk(test_paths, test_labels))
    classes, paths, labels = scan_class_folders(root)
    return split_sources("folder", classes, paths, labels, cfg, seed)
