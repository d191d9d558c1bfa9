"""SKIN7: the 7 diagnostic classes of ISIC 2018 Task 3, i.e. HAM10000 (Tschandl, Rosendahl & Kittler,
"The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common pigmented
skin lesions", Scientific Data 5, 180161, 2018; Codella et al., ISIC 2018 challenge, arXiv 1902.03368).
10,015 dermoscopic JPEGs (600x450): MEL 1113, NV 6705, BCC 514, AKIEC 327, BKL 1099, DF 115, VASC 142.

Any of these layouts under `data_root` (or under `data_root/ISIC_2018_Classification/`):
- CL_Pytorch's: `ISIC_2018_Classification/split_data/split_data_1_fold_{train,test}.csv` (2 columns,
  header like `image_train,label_train`, file names with `.jpg`, labels 0..6; 8,010 / 2,005 rows)
  with the images in `ISIC_2018_Classification/ISIC2018_Task3_Training_Input/`. The split is kept.
- The official ISIC 2018 files: `ISIC2018_Task3_Training_Input/` and
  `ISIC2018_Task3_Training_GroundTruth.csv` (also inside its `ISIC2018_Task3_Training_GroundTruth/`
  folder), header `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`, one-hot.
- HAM10000 from Harvard Dataverse (doi:10.7910/DVN/DBW86T): `HAM10000_images_part_1/`,
  `HAM10000_images_part_2/` and `HAM10000_metadata.csv` (column `dx`: akiec, bcc, bkl, df, mel, nv, vasc).
The images of the split CSVs are found in any of these image folders (by file name).

Class ids: the ground-truth column order MEL, NV, BCC, AKIEC, BKL, DF, VASC (0..6). The split CSVs and
their label -> name map are not published; the GT column order is the likely one but UNVERIFIED. When
the ground truth (GT CSV or HAM10000 metadata) is present beside the split CSVs, the CSV labels are
checked against it and named from it.

Without the split CSVs: a seeded stratified split with `test_fraction` (per class round(n * f) test),
seeded with the fixed FALLBACK_SEED so every run seed of a protocol sees one split; recorded as
FALLBACK in the split text. Images of one lesion can land in both train and test (HAM10000's
`lesion_id` groups them; the reference split is not known to group them either).
No option file of the reference framework defines a SKIN7 task split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_class_count
from dynammo.data.datasets.medical import FALLBACK_SEED, index_images, read_onehot_csv, read_rows, resolve
from dynammo.data.imageset import ImageSet, stratified_split
from dynammo.errors import UserError

CLASS_NAMES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]  # the GT CSV's column order
TOP_NAMES = ("ISIC_2018_Classification", "ISIC2018", "HAM10000")
IMAGE_FOLDERS = ("ISIC2018_Task3_Training_Input", "HAM10000_images_part_1", "HAM10000_images_part_2")
SPLIT_CSVS = ("split_data/split_data_1_fold_train.csv", "split_data/split_data_1_fold_test.csv")
GT_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
GT_NAMES = (GT_CSV, f"ISIC2018_Task3_Training_GroundTruth/{GT_CSV}")
HAM_META = ("HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata")
SOURCE = ("the ISIC 2018 Task 3 training data (https://challenge.isic-archive.com/data/#2018) or HAM10000 "
          "(Harvard Dataverse, doi:10.7910/DVN/DBW86T)")
LAYOUT = ("ISIC_2018_Classification/{split_data/split_data_1_fold_{train,test}.csv, "
          "ISIC2018_Task3_Training_Input/}, or ISIC2018_Task3_Training_Input/ + "
          "ISIC2018_Task3_Training_GroundTruth.csv, or HAM10000_images_part_{1,2}/ + HAM10000_metadata.csv")


def candidates(root: Path) -> List[Path]:
    return [root / t for t in TOP_NAMES if (root / t).is_dir()] + [root]


def first_file(tops: List[Path], names) -> Optional[Path]:
    return next((t / n for t in tops for n in names if (t / n).is_file()), None)


def read_ham_metadata(path: Path) -> List[Tuple[str, str]]:
    """HAM10000_metadata: [(image_id, class name)] from its `image_id` and `dx` columns."""
    rows = read_rows(path)
    header = [c.lower() for c in rows[0]]
    if "image_id" not in header or "dx" not in header:
        raise UserError(f"{path} has no image_id and dx columns (header {','.join(rows[0])[:100]!r}); "
                        "use the HAM10000 metadata file from Dataverse")
    i, d = header.index("image_id"), header.index("dx")
    out = []
    for number, row in enumerate(rows[1:], 2):
        name = row[d].upper() if len(row) > max(i, d) else ""
        if name not in CLASS_NAMES:
            raise UserError(f"{path} line {number} has dx {name.lower()!r}, not one of "
                            f"{', '.join(c.lower() for c in CLASS_NAMES)}; use the HAM10000 metadata file")
        out.append((row[i], name))
    return out


def read_split_csv(path: Path) -> List[Tuple[str, int]]:
    """CL_Pytorch's split CSV: rows `<file name>,<label 0..6>` after a header -> [(name, label)]."""
    if not path.is_file():
        raise UserError(f"split CSV {path} does not exist; put both split_data_1_fold_{{train,test}}.csv there, or "
                        "remove the other one to use the seeded fallback split")
    rows = read_rows(path)
    out = []
    for number, row in enumerate(rows, 1):
        if len(row) != 2:
            raise UserError(f"{path} line {number} must be '<image file>,<label>' (2 columns), got "
                            f"{','.join(row)[:80]!r}")
        try:
            value = float(row[1])
        except ValueError:
            if number == 1:  # the header (image_train,label_train)
                continue
            raise UserError(f"{path} line {number} has label {row[1]!r}, not an integer 0..6") from None
        if value != int(value) or not 0 <= int(value) < len(CLASS_NAMES):
            raise UserError(f"{path} line {number} has label {row[1]!r}, not an integer 0..6")
        out.append((row[0], int(value)))
    if not out:
        raise UserError(f"split CSV {path} lists no images")
    return out


def names_from_truth(rows: List[Tuple[str, int]], truth: Dict[str, str], csv_path: Path, truth_path: Path):
    """The class name of each CSV label, read off the ground truth of its images: one name per label."""
    seen: Dict[int, set] = {}
    for name, label in rows:
        gt = truth.get(Path(name).stem)
        if gt is not None:
            seen.setdefault(label, set()).add(gt)
    bad = {k: sorted(v) for k, v in seen.items() if len(v) > 1}
    if bad:
        k, v = next(iter(sorted(bad.items())))
        raise UserError(f"{csv_path} label {k} holds images of classes {', '.join(v)} in {truth_path}; "
                        "the split CSV and the ground truth disagree: check the files")
    names = {k: next(iter(v)) for k, v in seen.items()}
    if len(set(names.values())) != len(names) or len(names) != len(CLASS_NAMES):
        raise UserError(f"{csv_path} labels do not map one-to-one onto the 7 classes of {truth_path} "
                        f"({names}); check the files")
    return [names[k] for k in range(len(CLASS_NAMES))]


@dataset("skin7", LAYOUT, aliases=("isic2018", "ham10000"), shape=DatasetShape(len(CLASS_NAMES), 3, None))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    tops = candidates(root)
    image_dirs = [t / f for t in tops for f in IMAGE_FOLDERS if (t / f).is_dir()]
    if not image_dirs:
        raise UserError(f"SKIN7 (ISIC 2018 / HAM10000) not found under {root}: expected {LAYOUT}; get {SOURCE} "
                        "and set data_root to the folder holding it")
    index = index_images(image_dirs)
    where = ", ".join(str(d) for d in image_dirs)
    gt_path = first_file(tops, GT_NAMES)
    meta_path = None if gt_path else first_file(tops, HAM_META)
    truth_path = gt_path or meta_path
    truth = None
    if gt_path:
        truth = read_onehot_csv(gt_path, CLASS_NAMES, CLASS_NAMES)
    elif meta_path:
        truth = read_ham_metadata(meta_path)
    csvs = [first_file(tops, [c]) for c in SPLIT_CSVS]
    if any(csvs):
        train_csv = csvs[0] or csvs[1].parent / Path(SPLIT_CSVS[0]).name
        test_csv = csvs[1] or csvs[0].parent / Path(SPLIT_CSVS[1]).name
        train_rows, test_rows = read_split_csv(train_csv), read_split_csv(test_csv)
        check_class_count("SKIN7", len({y for _, y in train_rows}), len(CLASS_NAMES), train_csv)
        names, how = list(CLASS_NAMES), "label names assumed in the GT column order, unverified"
        if truth is not None:
            names = names_from_truth(train_rows + test_rows, dict(truth), train_csv, truth_path)
            how = f"label names checked against {truth_path.name}"
        mk = lambda rows, csv_path: ImageSet(np.asarray([y for _, y in rows], dtype=np.int64),
                                             sources=resolve(index, [n for n, _ in rows], csv_path, where),
                                             channels=3, size=cfg.img_size)
        return RawDataset("skin7", names, mk(train_rows, train_csv), mk(test_rows, test_csv), flip=True,
                          split=f"split CSVs {train_csv.name}/{test_csv.name} (CL_Pytorch's layout; no reference "
                                f"copy is public to check them against; {how})")
    if truth is None:
        raise UserError(f"SKIN7 at {where} has images but no labels: expected {GT_CSV} (official ISIC 2018) or "
                        f"HAM10000_metadata.csv (Dataverse) beside them, or the split CSVs {'/'.join(SPLIT_CSVS)}")
    ids = [i for i, _ in truth]
    labels = np.asarray([CLASS_NAMES.index(n) for _, n in truth], dtype=np.int64)
    check_class_count("SKIN7", len(set(labels.tolist())), len(CLASS_NAMES), truth_path)
    sources = resolve(index, ids, truth_path, where)
    order = np.argsort(np.asarray(ids), kind="stable")  # by image id: the split does not depend on the file order
    sources, labels = [sources[i] for i in order], labels[order]
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, FALLBACK_SEED)
    mk = lambda idx: ImageSet(labels[idx], sources=[sources[i] for i in idx], channels=3, size=cfg.img_size)
    return RawDataset("skin7", list(CLASS_NAMES), mk(train_idx), mk(test_idx), flip=True,
                      split=f"FALLBACK (split_data_1_fold CSVs absent): seeded stratified split of {truth_path.name}, "
                            f"test_fraction {cfg.test_fraction}, seed {FALLBACK_SEED} — not the reference split")
