"""SKIN8: 8 classes of the ISIC 2019 challenge training set (Combalia et al., "BCN20000: dermoscopic
lesions in the wild", arXiv 1908.02288, 2019; Tschandl et al. 2018, HAM10000; Codella et al.,
ISIC 2017, arXiv 1710.05006, 2018), in the fixed 4,260-image subset of the ACL paper's reference
framework (CL_Pytorch, `skin8_{train,test}_500.txt`). ISIC 2019 has 25,331 training JPEGs:
MEL 4522, NV 12875, BCC 3323, AK 867, BKL 2624, DF 239, VASC 253, SCC 628 (UNK is empty).

Layouts under `data_root` (or under `data_root/ISIC2019/`):
- CL_Pytorch's re-organised one: `ISIC2019/Data/<CLASS>/ISIC_xxxxxxx[_downsampled].jpg` with the
  reference lists `skin8_train_500.txt` / `skin8_test_500.txt` in `ISIC2019/` or `data_root/`
  (lines `Data/<CLASS>/<file>.jpg <label>`, CRLF; 3,555 / 705 lines).
- The official flat folder `ISIC_2019_Training_Input/` with `ISIC_2019_Training_GroundTruth.csv`
  (header `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`, one-hot). The lists are used with it too: their
  entries are found by file name.

Class ids: the lists' label order BKL, MEL, DF, NV, SCC, BCC, AK, VASC (0..7), which is NOT the GT
column order; `shuffle: false` gives the reference tasks {BKL,MEL}, {DF,NV}, {SCC,BCC}, {AK,VASC}.
Every list entry's class folder must agree with its label. The lists' md5 is checked against the
reference files (as shipped with CRLF, or CR-stripped); the split text says whether these are the
reference lists or other lists.

Without the lists: a seeded fallback from the rule the reference counts follow (per class: ids
sorted, k = min(n, 628) drawn with the fixed FALLBACK_SEED, test = floor(k/6), train = the rest),
from `Data/<CLASS>/` or the flat folder + GT CSV. It reproduces the reference per-class counts
(524/104, DF 200/39, VASC 211/42), the class membership of DF, VASC and SCC (all their images) and
the task pairs, but not the same images; recorded as FALLBACK in the split text. As in the
reference, images of one lesion can land in both train and test.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_class_count, read_list_lines, read_split_list
from dynammo.data.datasets.folder import is_image
from dynammo.data.datasets.medical import (FALLBACK_SEED, index_images, list_md5_status, read_onehot_csv, resolve,
                                           seeded_class_split)
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

CLASS_NAMES = ["BKL", "MEL", "DF", "NV", "SCC", "BCC", "AK", "VASC"]  # the reference lists' labels 0..7
GT_COLUMNS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
LISTS = ("skin8_train_500.txt", "skin8_test_500.txt")
# md5 of the reference lists: (as shipped, CRLF) and (carriage returns stripped)
REFERENCE_MD5 = {
    "skin8_train_500.txt": ("4e4b17d3c45834486ccf6da471937e41", "f4003a32137c9e9f342494ebf62a1716"),
    "skin8_test_500.txt": ("b40f44a2e91130d3b56ce35851be1cba", "3ab175dfec14fe85bc5f07a5bd74336f"),
}
CAP = 628  # images kept per class by the fallback (the SCC total, as in the reference lists)
TOP_NAMES = ("ISIC2019", "isic2019", "ISIC_2019")
FLAT = "ISIC_2019_Training_Input"
GT_CSV = "ISIC_2019_Training_GroundTruth.csv"
SOURCE = "https://challenge.isic-archive.com/data/#2019 (ISIC_2019_Training_Input.zip and its ground truth)"
LAYOUT = ("ISIC2019/Data/<CLASS>/*.jpg + skin8_{train,test}_500.txt, or ISIC_2019_Training_Input/ + "
          "ISIC_2019_Training_GroundTruth.csv (seeded fallback without the lists)")


def fallback_counts(n: int, cap: int = CAP) -> Tuple[int, int]:
    """(train, test) images of a class of n images under the fallback rule."""
    k = min(n, cap)
    return k - k // 6, k // 6


def check_labels(rows: List[Tuple[str, int]], path: Path) -> None:
    """Labels 0..7, each in agreement with its class folder (`Data/<CLASS>/file`)."""
    for rel, label in rows:
        if not 0 <= label < len(CLASS_NAMES):
            raise UserError(f"{path} labels {Path(rel).name} {label}, not one of 0..7; use the skin8 lists")
        folder = Path(rel).parent.name
        if folder.upper() in CLASS_NAMES and folder.upper() != CLASS_NAMES[label]:
            raise UserError(f"{path} labels {Path(rel).parent.name}/{Path(rel).name} {label} ({CLASS_NAMES[label]} "
                            f"in the reference order {', '.join(CLASS_NAMES)}), but it is in folder {folder}; "
                            "fix the list")


def find_lists(dirs: Sequence[Path]) -> Optional[Tuple[Path, Path]]:
    for d in dirs:
        found = [d / n for n in LISTS]
        if all(p.is_file() for p in found):
            return found[0], found[1]
        if any(p.is_file() for p in found):
            have, lack = (found[0], found[1]) if found[0].is_file() else (found[1], found[0])
            raise UserError(f"found {have} but not {lack}; put both skin8 lists there, or neither to use the "
                            "seeded fallback split")
    return None


def list_split_text(lists: Tuple[Path, Path]) -> str:
    status = [list_md5_status(p, REFERENCE_MD5[p.name]) for p in lists]
    names = f"{lists[0].name}/{lists[1].name}"
    if all(status):
        return f"reference lists {names} (md5 match{', CR-stripped' if 'LF' in status else ''})"
    other = " and ".join(p.name for p, s in zip(lists, status) if not s)
    return f"OTHER lists {names} (the md5 of {other} is not the reference lists'): not the reference split"


def class_folders(data: Path) -> List[List[str]]:
    """The files of each class of `Data/<CLASS>/`, in label order; all 8 folders and no others."""
    present = {p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing = [c for c in CLASS_NAMES if c not in present]
    if missing:
        raise UserError(f"SKIN8 folder {data} lacks the class folder(s) {', '.join(missing)}; expected "
                        f"{data}/<CLASS>/*.jpg for {', '.join(CLASS_NAMES)}")
    extra = sorted(present - set(CLASS_NAMES))
    if extra:
        raise UserError(f"SKIN8 folder {data} holds folder(s) {', '.join(extra)} that are not SKIN8 classes "
                        f"({', '.join(CLASS_NAMES)}); move them out")
    out = []
    for c in CLASS_NAMES:
        files = sorted(str(p) for p in (data / c).iterdir() if p.is_file() and is_image(p.name))
        if not files:
            raise UserError(f"class folder {data / c} holds no images; add them or use the flat ISIC 2019 folder")
        out.append(files)
    return out


@dataset("skin8", LAYOUT, aliases=("isic2019",), shape=DatasetShape(len(CLASS_NAMES), 3, None))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    tops = [root / t for t in TOP_NAMES if (root / t).is_dir()] + [root]
    data_top = next((t for t in tops if (t / "Data").is_dir()), None)
    flat = next((t / FLAT for t in tops if (t / FLAT).is_dir()), None)
    if flat is None and root.name == FLAT and root.is_dir():
        flat = root
    if data_top is None and flat is None:
        raise UserError(f"SKIN8 (ISIC 2019) not found under {root}: expected {LAYOUT}; get it from {SOURCE} and set "
                        "data_root to the folder holding it")
    lists = find_lists(([data_top] if data_top else []) + [t for t in tops if t != data_top])
    if lists is not None:
        if data_top is not None:
            parts = [read_split_list(p, data_top) for p in lists]
            for p, rows in zip(lists, parts):
                check_labels([(str(Path(f).relative_to(data_top)), y) for f, y in rows], p)
        else:
            index, parts = index_images([flat]), []
            for p in lists:  # entries found in the flat folder by file name
                rows = read_list_lines(p)
                check_labels(rows, p)
                parts.append(list(zip(resolve(index, [Path(r).name for r, _ in rows], p, str(flat)),
                                      [y for _, y in rows])))
        for p, rows in zip(lists, parts):
            check_class_count("SKIN8", len({y for _, y in rows}), len(CLASS_NAMES), p)
        mk = lambda rows: ImageSet(np.asarray([y for _, y in rows], dtype=np.int64), sources=[f for f, _ in rows],
                                   channels=3, size=cfg.img_size)
        return RawDataset("skin8", list(CLASS_NAMES), mk(parts[0]), mk(parts[1]), flip=True,
                          split=list_split_text(lists))
    if data_top is not None:
        files_by_class, origin = class_folders(data_top / "Data"), f"{data_top.name}/Data/<CLASS>/"
    else:
        gt = next((p for p in (flat.parent / GT_CSV, flat / GT_CSV) if p.is_file()), None)
        if gt is None:
            raise UserError(f"SKIN8 found the images in {flat} but neither the skin8 lists ({', '.join(LISTS)}) nor "
                            f"{GT_CSV}; put the ground-truth CSV beside {flat.name}/ (from {SOURCE})")
        truth = read_onehot_csv(gt, GT_COLUMNS, CLASS_NAMES)
        index = index_images([flat])
        paths = resolve(index, [i for i, _ in truth], gt, str(flat))
        files_by_class = [[p for p, (_, c) in zip(paths, truth) if c == name] for name in CLASS_NAMES]
        empty = [n for n, f in zip(CLASS_NAMES, files_by_class) if not f]
        if empty:
            raise UserError(f"{gt} has no images of class(es) {', '.join(empty)}; use the official ground-truth CSV")
        origin = f"{flat.name}/ + {gt.name}"
    tr_p, tr_l, te_p, te_l = seeded_class_split(files_by_class, lambda k: k // 6, FALLBACK_SEED, CAP)
    mk = lambda p, l: ImageSet(l, sources=p, channels=3, size=cfg.img_size)
    return RawDataset("skin8", list(CLASS_NAMES), mk(tr_p, tr_l), mk(te_p, te_l), flip=True,
                      split=f"FALLBACK (lists {'/'.join(LISTS)} absent): {origin} seeded per-class k=min(n,{CAP}), "
                            f"test=floor(k/6), seed {FALLBACK_SEED} — same counts as the reference lists, not the "
                            "same images")
