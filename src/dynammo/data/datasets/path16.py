"""PATH16: the 16-class pathology composite of ACL (Zhang et al., "Adapter Learning in Pretrained
Feature Extractor for Continual Learning of Diseases", MICCAI 2023, arXiv 2304.09042), 7 public
pathology datasets, one task per dataset.

On disk (as the reference framework CL_Pytorch reads it):
    Pathology16/<subset>/{train,test}/<class folder>/<image>
with the 7 subsets in the reference "order 5" and their class counts:
    MHIST 2, breast_cancer 2, oral_cancer 2, Patch_Camelyon 2, TCGA_STD 4, lung 2, colon 2
-> the ACL protocol's tasks 2,2,2,2,4,2,2 (`increment: [2, 2, 2, 2, 4, 2, 2]`, `shuffle: false`).
The prepared folders are not public (nor are their class-folder names or the per-class sampling; the
reference docstring says 800 train / 100 test per class): build them from the source datasets.
`data_root` is the folder holding `Pathology16/`, or `Pathology16/` itself.

Class ids: the subset order above, then the SORTED class-folder names within a subset (CL_Pytorch
numbers them in `os.listdir` order, which depends on the filesystem and can differ between train and
test; here train and test must hold the same class folders). Class names are `<subset>/<class>`.
Each subset's class count is checked (a missing subset or split folder is named).

`shuffle: true` (without `class_order`) is refused: a class-level shuffle would mix classes of
different pathology datasets within a task, which is not the benchmark (CL_Pytorch shuffles whole
subsets instead). Give `class_order` to choose another order explicitly. A horizontal flip is
label-preserving for pathology patches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_class_count
from dynammo.data.datasets.folder import scan_class_folders
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

SUBSETS = (("MHIST", 2), ("breast_cancer", 2), ("oral_cancer", 2), ("Patch_Camelyon", 2), ("TCGA_STD", 4),
           ("lung", 2), ("colon", 2))
TASK_SIZES = [n for _, n in SUBSETS]
NUM_CLASSES = sum(TASK_SIZES)  # 16
TOP_NAMES = ("Pathology16", "pathology16", "PATH16", "path16")
LAYOUT = "Pathology16/<subset>/{train,test}/<class>/<image>"
ORIGIN = ("the prepared folders are not public (ACL, Zhang et al. 2023, arXiv 2304.09042): build them from the "
          "7 source datasets")


def find_top(root: Path) -> Path:
    for cand in [root / t for t in TOP_NAMES] + [root]:
        if cand.is_dir() and any((cand / name).is_dir() for name, _ in SUBSETS):
            return cand
    raise UserError(f"PATH16 not found under {root}: expected {LAYOUT} for the subsets "
                    f"{', '.join(name for name, _ in SUBSETS)}; {ORIGIN}; set data_root to the folder holding "
                    "Pathology16/ (or to Pathology16/ itself)")


@dataset("path16", f"{LAYOUT}, 7 subsets in order MHIST, breast_cancer, oral_cancer, Patch_Camelyon, TCGA_STD, "
                   "lung, colon (tasks 2,2,2,2,4,2,2; not public)", aliases=("pathology16",),
         shape=DatasetShape(NUM_CLASSES, 3, None))
def load(cfg, root, seed) -> RawDataset:
    if cfg.shuffle and cfg.class_order is None:
        raise UserError("path16: shuffle=true would mix classes of different pathology datasets within a task; "
                        "set shuffle=false (the reference subset order, tasks 2,2,2,2,4,2,2) or give class_order")
    top = find_top(Path(root))
    absent = [name for name, _ in SUBSETS if not (top / name).is_dir()]
    if absent:
        raise UserError(f"PATH16 at {top} lacks the subset folder(s) {', '.join(str(top / a) for a in absent)}; "
                        f"expected {LAYOUT} for all 7 subsets")
    class_names, parts = [], {"train": ([], []), "test": ([], [])}
    for name, expected in SUBSETS:
        folders = {}
        for split in ("train", "test"):
            where = top / name / split
            if not where.is_dir():
                raise UserError(f"PATH16 subset folder {where} does not exist; expected {top}/{name}/{{train,test}}/"
                                "<class>/<image>")
            folders[split] = scan_class_folders(where)
        if folders["train"][0] != folders["test"][0]:
            raise UserError(f"PATH16 subset {top / name}: train has class folders {', '.join(folders['train'][0])} "
                            f"but test has {', '.join(folders['test'][0])}; make them the same")
        classes = folders["train"][0]
        if len(classes) != expected:
            raise UserError(f"PATH16 subset {top / name} has {len(classes)} class folders ({', '.join(classes)}), "
                            f"but {name} has {expected}; check the folder")
        offset = len(class_names)
        class_names += [f"{name}/{c}" for c in classes]
        for split in ("train", "test"):
            _, paths, labels = folders[split]
            parts[split][0].extend(paths)
            parts[split][1].extend((labels + offset).tolist())
    check_class_count("PATH16", len(class_names), NUM_CLASSES, top)
    mk = lambda split: ImageSet(np.asarray(parts[split][1], dtype=np.int64), sources=parts[split][0], channels=3,
                                size=cfg.img_size)
    return RawDataset("path16", class_names, mk("train"), mk("test"), flip=True,
                      split=f"prepared folders {top.name}/<subset>/{{train,test}} (class ids: subset order 5, "
                            "then sorted class folders)")
