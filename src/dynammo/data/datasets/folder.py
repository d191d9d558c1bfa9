"""Folder-per-class image trees (torchvision ImageFolder layout): the user's own data.

Layouts (`data_root` may also hold one single folder that holds them, e.g. `data_root/BrainTumorMRI/`):
  `data_root/<class>/<image>`: no split on disk, so a seeded stratified split (cfg.test_fraction);
  `data_root/{train,test}/<class>/<image>`: the split is kept. Split folder names are recognised in
  any case: train|training, test|testing, val|valid|validation. With train and val but no test, val is
  the test split; with train, test and val, val is not used; a test or val folder without a train
  folder is an error. The split text (printed and saved as data_split) names the folders used.
Class ids come from sorted folder names, never from the order a directory listing returns.

A class folder holds its images directly: one holding sub-folders of images (a folder of classes),
or images and such sub-folders mixed, is refused with the layout expected.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from dynammo.data.datasets import RawDataset, dataset
from dynammo.data.datasets.files import check_class_count
from dynammo.data.imageset import ImageSet, open_image, stratified_split
from dynammo.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
LAYOUT_HINT = "data_root/<class>/<image> or data_root/{train,test}/<class>/<image>"
SPLIT_ROLES = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "val", "valid": "val", "validation": "val"}


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def split_role(name: str) -> Optional[str]:
    """'train' | 'test' | 'val' for a split folder or file stem (any case), else None."""
    return SPLIT_ROLES.get(name.lower())


def entries(folder: Path) -> Tuple[List[str], List[str]]:
    """-> (sorted sub-folder names, sorted image file names) directly in `folder` (hidden ones skipped)."""
    dirs, images = [], []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        dirs.append(e.name)
                    elif is_image(e.name) and e.is_file():
                        images.append(e.name)
                except OSError as exc:  # a symbolic link loop (ELOOP), an entry that vanished or is unreadable
                    raise unreadable_entry(folder / e.name, exc) from None
    except OSError as exc:
        raise unreadable_entry(folder, exc) from None
    return sorted(dirs), sorted(images)


def unreadable_entry(path: Path, exc: OSError) -> UserError:
    loop = " (a symbolic link loop)" if getattr(exc, "errno", None) == errno.ELOOP else ""
    return UserError(f"{path} cannot be read: {exc.strerror or exc}{loop}; remove or fix it")


def has_images(folder: Path) -> bool:
    try:
        return any(is_image(p.name) and p.is_file() for p in folder.rglob("*"))
    except OSError as exc:
        raise unreadable_entry(folder, exc) from None


def list_images(folder: Path) -> List[str]:
    """Sorted paths of the images directly in `folder` (a fast scandir, for folders of 1000s of files)."""
    return [str(folder / n) for n in entries(folder)[1]]


def scan_class_folders(root: Path) -> Tuple[List[str], List[str], np.ndarray]:
    """-> (sorted class names, image paths, labels) of `root/<class>/<image>`. An empty class folder,
    one that holds class folders, or one that mixes images and sub-folders of images is an error."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; set data_root to the folder holding one sub-folder per class")
    classes, loose = entries(root)
    if not classes:
        raise UserError(f"dataset folder {root} holds no class sub-folders; expected {root}/<class>/<image>")
    if loose:
        raise UserError(f"dataset folder {root} holds images ({loose[0]}) beside its class sub-folders; expected "
                        f"{LAYOUT_HINT}: move the loose images into their class folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        subdirs, images = entries(folder)
        nested = [d for d in subdirs if has_images(folder / d)]
        if nested and images:
            raise UserError(f"class folder {folder} mixes images and sub-folders of images ({nested[0]}/); expected "
                            f"{LAYOUT_HINT}: put all of the class's images directly in {folder}")
        if nested:
            raise UserError(f"class folder {folder} holds no images of its own but sub-folders of images "
                            f"({', '.join(nested[:3])}): it is a folder of classes, not a class; expected {LAYOUT_HINT}: "
                            "set data_root to the folder whose sub-folders are the classes")
        if not images:
            raise UserError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add images or remove the folder")
        paths += [str(folder / n) for n in images]
        labels += [label] * len(images)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def scan_split_folders(train: Path, test: Path):
    """Two class-folder trees of one dataset -> (class names, (train paths, labels), (test paths, labels));
    both must hold the same class folders (the ones only in one are named)."""
    classes, train_paths, train_labels = scan_class_folders(train)
    test_classes, test_paths, test_labels = scan_class_folders(test)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        diff = "; ".join(f"only in {where.name}: {', '.join(names[:5])}" for where, names in
                         ((train, only_train), (test, only_test)) if names)
        raise UserError(f"{train} and {test} have different class folders ({diff}); make them the same")
    return classes, (train_paths, train_labels), (test_paths, test_labels)


def by_split_role(names) -> Dict[str, List[str]]:
    """{'train' | 'test' | 'val': the names (folders or CSV stems) that play that role}."""
    found: Dict[str, List[str]] = {}
    for name in names:
        role = split_role(Path(name).stem)
        if role:
            found.setdefault(role, []).append(name)
    return found


def pre_split_rgb_dataset(name: str, title: str, top: Path, found: Dict[str, List[str]], num_classes: int, cfg,
                          no_test_hint: str, split_prefix: str) -> RawDataset:
    """A benchmark shipped as `top/{train,test|val}/<class>/` (RGB, file-backed), its documented class
    count checked; a train folder without a test one is an error ending with `no_test_hint`."""
    train, test, text = choose_splits(found, top, "folder")
    if test is None:
        raise UserError(f"{top} holds {train}/ but no test/ (or val/) folder; {no_test_hint}")
    names, (train_paths, train_labels), (test_paths, test_labels) = scan_split_folders(top / train, top / test)
    check_class_count(title, len(names), num_classes, top / train)
    mk = lambda paths, labels: ImageSet(np.asarray(labels, dtype=np.int64), sources=list(paths), channels=3,
                                        size=cfg.img_size)
    return RawDataset(name, names, mk(train_paths, train_labels), mk(test_paths, test_labels),
                      split=f"{split_prefix} {text} in {top}")


def guess_channels(paths, n: int = 16) -> int:
    """1 if the first images are all single-channel, else 3."""
    for p in list(paths)[:n]:
        with open_image(p) as img:  # one line for an unreadable file or one past max_image_pixels
            if img.mode not in ("L", "I", "I;16", "1", "F"):
                return 3
    return 1


def split_sources(name, class_names, sources, labels, cfg, seed, flip=True, channels: Optional[int] = None,
                  note: str = "") -> RawDataset:
    """A dataset without an official split: seeded stratified split of lazily decoded sources.
    `note` (what was read) goes in front of the split text."""
    channels = guess_channels(sources) if channels is None else channels
    labels = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, seed)
    mk = lambda idx: ImageSet(labels[idx], sources=[sources[i] for i in idx], channels=channels, size=cfg.img_size)
    text = f"seeded stratified split, test_fraction {cfg.test_fraction}, seed {seed}"
    return RawDataset(name, class_names, mk(train_idx), mk(test_idx), flip=flip,
                      split=f"{note}: {text}" if note else text)


def choose_splits(found: Dict[str, List[str]], where: Path, kind: str) -> Tuple[Optional[str], Optional[str], str]:
    """The train and test split of the split folders/files found ({role: [names]}) and a text naming
    them. kind is 'folder' or 'file' (for messages). -> (train, test or None, text)."""
    for role, names in found.items():
        if len(names) > 1:
            raise UserError(f"{where} holds {len(names)} {role} {kind}s ({', '.join(names)}); keep one of them")
    train, test, val = (found.get(r, [None])[0] for r in ("train", "test", "val"))
    if train is None:
        raise UserError(f"{where} holds {' and '.join(n for n in (test, val) if n)} but no train {kind} "
                        "(train or training); add it, or set data_root to a folder of class folders")
    if test is not None:
        text = f"{kind}s {train} (train) and {test} (test)" + (f"; {val} not used" if val else "")
    elif val is not None:
        test, text = val, f"{kind}s {train} (train) and {val} (test: there is no test {kind}, so {val} is the test split)"
    else:
        text = f"{kind} {train} only"
    return train, test, text


def descend(root: Path) -> Path:
    """A data_root holding one single folder (not a split folder, not a class) stands for that folder."""
    for _ in range(8):
        dirs, images = entries(root)
        if images or len(dirs) != 1 or split_role(dirs[0]):
            return root
        inner = root / dirs[0]
        if entries(inner)[1]:  # it holds images: a dataset of one class
            return root
        root = inner
    return root


@dataset("folder", "data_root/<class>/<image>, or data_root/{train,test}/<class>/<image> (train|training, "
                   "test|testing, val|valid|validation, any case)", aliases=("imagefolder",))
def load(cfg, root, seed) -> RawDataset:
    data_root = Path(root)
    if not data_root.is_dir():
        raise UserError(f"dataset folder {data_root} does not exist; set data_root to the folder holding one "
                        "sub-folder per class")
    root = descend(data_root)
    dirs, _ = entries(root)
    found = by_split_role(dirs)
    if not found:
        classes, paths, labels = scan_class_folders(root)
        return split_sources("folder", classes, paths, labels, cfg, seed)
    others = [d for d in dirs if not split_role(d)]
    if others:
        split_dirs = sorted(n for names in found.values() for n in names)
        raise UserError(f"{root} holds split folders ({', '.join(split_dirs)}) and other folders ({', '.join(others[:3])}); "
                        f"expected {LAYOUT_HINT}: move or remove {others[0]}/")
    rel = "" if root == data_root else f"{root.relative_to(data_root).as_posix()}/"
    named = {role: [rel + n for n in names] for role, names in found.items()}
    train, test, text = choose_splits(named, data_root, "folder")
    if test is None:
        classes, train_paths, train_labels = scan_class_folders(data_root / train)
        return split_sources("folder", classes, train_paths, train_labels, cfg, seed, note=text)
    classes, (train_paths, train_labels), (test_paths, test_labels) = scan_split_folders(data_root / train,
                                                                                         data_root / test)
    channels = guess_channels(train_paths)
    mk = lambda p, lab: ImageSet(lab, sources=p, channels=channels, size=cfg.img_size)
    return RawDataset("folder", classes, mk(train_paths, train_labels), mk(test_paths, test_labels), split=text)
