"""CUB-200-2011 (Wah, Branson, Welinder, Perona & Belongie, "The Caltech-UCSD Birds-200-2011
Dataset", Caltech CNS-TR-2011-001): 11,788 photographs of 200 bird species.

The official `CUB_200_2011/` layout (under data_root, or data_root itself), lines `<id> <value>`:
  `images.txt` (`<image id> <NNN.Class_Name>/<file>.jpg`), `image_class_labels.txt` (`<image id>
  <class id 1..200>`), `train_test_split.txt` (`<image id> <1 train | 0 test>`), `classes.txt`
  (`<class id> <NNN.Class_Name>`), `images/<NNN.Class_Name>/<file>.jpg`; bounding boxes, parts and
  attributes are unused. When the folder is missing, `CUB_200_2011.tgz` in data_root is md5-checked
  and extracted (safely), or downloaded from URL first (unless `download: false`).

Class ids: class id - 1 (the dataset's label order, which is also the sorted folder order). Class
names: the classes.txt entries (`001.Black_footed_Albatross`, ...). Split: the official
train_test_split.txt (5,994 train / 5,794 test). The documented 200 classes are checked, and every
image's folder must be the folder of its class. Images are decoded as RGB, file-backed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import (check_class_count, extract_archive, locate, missing_files_error,
                                          obtain_archive)
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

NUM_CLASSES = 200
TOP = "CUB_200_2011"
ARCHIVE = "CUB_200_2011.tgz"
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
LISTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def find_top(root: Path, allow_download: bool) -> Path:
    for cand in (root / TOP, root):
        if (cand / "images.txt").is_file():
            return cand
    archive = obtain_archive(root, ARCHIVE, URL, MD5, "CUB-200-2011", allow_download, expected=f"{root}/{TOP}/images.txt")
    extract_archive(archive, root, "CUB-200-2011")
    return locate(root, (TOP,), "images.txt", "CUB-200-2011", f"{TOP}/images.txt inside {archive.name}")


def read_pairs(path: Path) -> Dict[int, str]:
    """{id: value} of a CUB `<id> <value>` list (LF or CRLF); a malformed or repeated line is an error."""
    if not path.is_file():
        raise UserError(f"split list {path} does not exist; extract {ARCHIVE} again (it holds {', '.join(LISTS)})")
    out: Dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise UserError(f"{path} line {number} must be '<id> <value>', got {line[:80]!r}")
        key = int(parts[0])
        if key in out:
            raise UserError(f"{path} line {number} repeats id {key}; use the official file")
        out[key] = parts[1].strip()
    if not out:
        raise UserError(f"{path} is empty; extract {ARCHIVE} again")
    return out


@dataset("cub200", f"data_root/{TOP}/ (images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
                   f"images/<NNN.Name>/; downloads {ARCHIVE} when missing)", aliases=("cub", "cub_200_2011", "cub-200"),
         shape=DatasetShape(NUM_CLASSES, 3, None))
def load(cfg, root, seed) -> RawDataset:
    top = find_top(Path(root), bool(cfg.get("download", True)))
    images, labels, is_train, classes = (read_pairs(top / n) for n in LISTS)
    check_class_count("CUB-200-2011", len(classes), NUM_CLASSES, top / "classes.txt")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise UserError(f"{top / 'classes.txt'} must number its classes 1..{len(classes)}; use the official file")
    names = [classes[k] for k in range(1, len(classes) + 1)]
    for other, listing in ((labels, LISTS[1]), (is_train, LISTS[2])):
        lacking = sorted(set(images) - set(other)) or sorted(set(other) - set(images))
        if lacking:
            raise UserError(f"{top / listing} and images.txt disagree on image id {lacking[0]}; use the official files")
    parts = {True: ([], []), False: ([], [])}
    missing = []
    for image_id in sorted(images):
        rel, cls, flag = images[image_id], labels[image_id], is_train[image_id]
        if not cls.isdigit() or not 1 <= int(cls) <= len(names) or flag not in ("0", "1"):
            raise UserError(f"image id {image_id}: class {cls!r} (image_class_labels.txt) must be 1..{len(names)} and "
                            f"split flag {flag!r} (train_test_split.txt) 1 or 0; use the official files")
        if Path(rel).parts[0] != names[int(cls) - 1]:
            raise UserError(f"{top / 'images.txt'}: image id {image_id} ({rel}) is not in the folder of its class "
                            f"{cls} ({names[int(cls) - 1]}); the lists are not from one CUB-200-2011 copy")
        path = top / "images" / rel
        if not path.is_file():
            missing.append(f"images/{rel}")
        parts[flag == "1"][0].append(str(path))
        parts[flag == "1"][1].append(int(cls) - 1)
    if missing:
        raise missing_files_error(top / "images.txt", missing, top)
    mk = lambda p: ImageSet(np.asarray(p[1], dtype=np.int64), sources=p[0], channels=3, size=cfg.img_size)
    return RawDataset("cub200", names, mk(parts[True]), mk(parts[False]), split="official train_test_split.txt")
