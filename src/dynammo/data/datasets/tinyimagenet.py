"""Tiny ImageNet (Le & Yang, "Tiny ImageNet Visual Recognition Challenge", Stanford CS231N, 2015):
200 ImageNet classes, 64x64 JPEGs, 500 training and 50 validation images per class.

The official `tiny-imagenet-200/` layout (under data_root, or data_root itself):
  `wnids.txt` (the 200 wnids, one a line, unsorted), `words.txt` (`<wnid>\\t<names>` for all synsets),
  `train/<wnid>/images/<wnid>_<k>.JPEG` (+ `train/<wnid>/<wnid>_boxes.txt`, unused),
  `val/images/val_<k>.JPEG` + `val/val_annotations.txt` (`<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>`),
  `test/images/` (unlabelled, unused).
When the folder is missing, `tiny-imagenet-200.zip` in data_root is md5-checked and extracted (safely),
or downloaded from URL first (unless `download: false`).

Class ids: sorted wnids (CL_Pytorch sorts the train folders the same way). Class names: the first name
of the wnid's words.txt entry (the wnid when words.txt is absent; a repeated name gets its wnid
appended). Split: the official one, with val as the test split (the test images have no labels).
wnids.txt must list exactly the 200 classes: a modified copy with more (e.g. 202) is an error naming
the extra ones. Images are decoded as RGB (some are grayscale) at their 64x64 (unless img_size says
otherwise), file-backed until load_data decodes them into memory (110,000 images: about 1.4 GB).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import (check_class_count, extract_archive, locate, missing_files_error,
                                          obtain_archive)
from dynammo.data.datasets.folder import entries, list_images
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

NUM_CLASSES = 200
TOP = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def find_top(root: Path, allow_download: bool) -> Path:
    for cand in (root / TOP, root):
        if (cand / "wnids.txt").is_file():
            return cand
    archive = obtain_archive(root, ARCHIVE, URL, MD5, "TinyImageNet", allow_download,
                             expected=f"{root}/{TOP}/wnids.txt")
    extract_archive(archive, root, "TinyImageNet")
    return locate(root, (TOP,), "wnids.txt", "TinyImageNet", f"{TOP}/wnids.txt inside {archive.name}")


def read_wnids(path: Path) -> List[str]:
    wnids = [w.strip() for w in path.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()]
    dup = sorted({w for w in wnids if wnids.count(w) > 1})
    if dup:
        raise UserError(f"{path} lists {dup[0]} twice; use the official wnids.txt")
    if len(wnids) > NUM_CLASSES:
        extra = wnids[NUM_CLASSES:]
        raise UserError(f"{path} lists {len(wnids)} wnids, but TinyImageNet has {NUM_CLASSES}: the extra "
                        f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (after line {NUM_CLASSES}) make "
                        f"it a modified copy; remove them with their train/ folders and val lines, or get {URL}")
    check_class_count("TinyImageNet", len(wnids), NUM_CLASSES, path)
    return sorted(wnids)


def class_names(top: Path, wnids: List[str]) -> List[str]:
    words: Dict[str, str] = {}
    path = top / "words.txt"
    if path.is_file():
        wanted = set(wnids)
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                words[wnid] = text.split(",")[0].strip()
    names = [words.get(w, w) for w in wnids]
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]


def read_train(top: Path, wnids: List[str]):
    train = top / "train"
    if not train.is_dir():
        raise UserError(f"{top} lacks train/; extract {ARCHIVE} again")
    extra = sorted(set(entries(train)[0]) - set(wnids))
    if extra:
        raise UserError(f"{train} holds folders that wnids.txt does not list ({', '.join(extra[:5])}); it is a "
                        "modified copy: remove them or get the official zip")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = train / wnid / "images"
        files = list_images(folder) if folder.is_dir() else []
        if not files:
            raise UserError(f"{folder} is missing or holds no images; extract {ARCHIVE} again")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def read_val(top: Path, wnids: List[str]):
    listing = top / "val" / "val_annotations.txt"
    if not listing.is_file():
        raise UserError(f"split list {listing} does not exist; it labels the val images (the test split): "
                        f"extract {ARCHIVE} again")
    index = {w: i for i, w in enumerate(wnids)}
    images = top / "val" / "images"
    rows, missing = [], []
    for number, line in enumerate(listing.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) < 2:
            raise UserError(f"{listing} line {number} must be '<file>\\t<wnid>\\t<box>', got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise UserError(f"{listing} line {number} labels {name} with {wnid}, which wnids.txt does not list; "
                            "it is a modified copy: remove the line or get the official zip")
        if not (images / name).is_file():
            missing.append(f"images/{name}")
        rows.append((str(images / name), index[wnid]))
    if missing:
        raise missing_files_error(listing, missing, top / "val")
    if not rows:
        raise UserError(f"split list {listing} lists no images")
    return [r[0] for r in rows], [r[1] for r in rows]


@dataset("tinyimagenet", f"data_root/{TOP}/ (wnids.txt, train/<wnid>/images/, val/images/ + val_annotations.txt; "
                         f"downloads {ARCHIVE} when missing)", aliases=("tiny_imagenet", "tiny-imagenet", "tinyimagenet200"),
         shape=DatasetShape(NUM_CLASSES, 3, 64))
def load(cfg, root, seed) -> RawDataset:
    top = find_top(Path(root), bool(cfg.get("download", True)))
    wnids = read_wnids(top / "wnids.txt")
    train_paths, train_labels = read_train(top, wnids)
    val_paths, val_labels = read_val(top, wnids)
    # every official image is 64x64: saying so lets load_data see that the set fits in memory
    mk = lambda lab, p: ImageSet(np.asarray(lab, dtype=np.int64), sources=p, channels=3, size=cfg.img_size or 64)
    return RawDataset("tinyimagenet", class_names(top, wnids), mk(train_labels, train_paths), mk(val_labels, val_paths),
                      split="official train/ and val/ (val_annotations.txt) as the test split; test/ is unlabelled")
