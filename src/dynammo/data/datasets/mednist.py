"""MedNIST: 58,954 grayscale 64x64 JPEGs of 6 classes, folder per class (`<top>/<Class>/<n>.jpeg`).

Read from an extracted folder or straight from `mednist.tar.gz` (any top folder name: the class is
the image's parent folder). No official split exists, so a seeded stratified split is made.
"""
from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_member
from dynammo.data.datasets.folder import is_image, scan_class_folders, split_sources
from dynammo.errors import UserError

ARCHIVE_NAMES = ("mednist.tar.gz", "MedNIST.tar.gz", "mednist.tgz")
FOLDER_NAMES = ("MedNIST", "mednist", "resized")


def read_archive(path: Path):
    """-> {class name: [(member name, jpeg bytes), ...]} from a .tar.gz, without extracting it."""
    by_class = defaultdict(list)
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                check_member(path, member.name, "MedNIST")
                if not member.isfile() or not is_image(member.name):
                    continue
                parts = Path(member.name).parts
                if len(parts) < 2:
                    continue
                by_class[parts[-2]].append((f"{path}:{member.name}", tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"archive {path} is corrupt or truncated ({exc}); download it again") from exc
    if not by_class:
        raise UserError(f"archive {path} holds no images in <folder>/<class>/<image> layout")
    return by_class


def find_folder(root: Path) -> Path:
    """The folder whose sub-folders are the classes: root itself or a known name below it."""
    for name in FOLDER_NAMES:
        for cand in (root / name, root / name / "resized"):
            if cand.is_dir():
                return find_folder_inner(cand)
    return find_folder_inner(root)


def find_folder_inner(folder: Path) -> Path:
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and not any(is_image(f.name) for f in subdirs[0].iterdir() if f.is_file()):
        return subdirs[0]  # one top folder of any name
    return folder


@dataset("mednist", "data_root/mednist.tar.gz, or data_root/MedNIST/<Class>/*.jpeg", shape=DatasetShape(6, 1, 64))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    archive = root if root.is_file() else next((root / n for n in ARCHIVE_NAMES if (root / n).is_file()), None)
    if archive is not None:
        by_class = read_archive(archive)
        names = sorted(by_class)
        sources, labels = [], []
        for label, name in enumerate(names):
            items = sorted(by_class[name], key=lambda t: t[0])
            sources += items
            labels += [label] * len(items)
        labels = np.asarray(labels, dtype=np.int64)
    elif root.is_dir():
        names, sources, labels = scan_class_folders(find_folder(root))
    else:
        raise UserError(
            f"MedNIST not found: expected {root}/mednist.tar.gz or an extracted {root}/MedNIST/<Class>/*.jpeg; "
            "set data_root to the folder that holds it"
        )
    return split_sources("mednist", names, sources, labels, cfg, seed)
