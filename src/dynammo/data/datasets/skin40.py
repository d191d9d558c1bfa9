"""SKIN40: 40 classes of SD-198 (Sun, Yang, Liu, Chen, Rao & Bai, "A Benchmark for Automatic Visual
Classification of Clinical Skin Disease Images", ECCV 2016), as the reference framework CL_Pytorch
uses them: 60 clinical photographs per class, 50 train / 10 test (2,000 / 400).
SD-198 (198 classes, 6,584 images) is given on request for research use:
http://cv.nankai.edu.cn/projects/SD-198/ .

On disk (under `data_root`, or `data_root` being `SD-198/`):
    SD-198/images/<Class_Name>/<file>.jpg
    SD-198/main_classes_split/train_1.txt, val_1.txt   (lines `<Class_Name>/<file>.jpg <label>`, CRLF)
`main_classes_split` was made by the reference authors' group, not shipped with SD-198; CL_Pytorch also
ships `skin40_{train,test}.txt` in that format, accepted in `SD-198/` as well. The lists' md5 is
compared with those files' (CRLF or CR-stripped) and the split text says whether they match.

Class ids: the lists' label order (CLASS_NAMES below, 0..39, not alphabetical); every entry's class
folder must agree with its label. Class names contain parentheses and file names brackets: paths are
joined, never globbed or matched as patterns.

Without the lists: the 40 named class folders (all must exist; the other 158 SD-198 classes are
ignored), per class the files sorted and permuted with the fixed FALLBACK_SEED, test = floor(n/6)
(10 of 60), train = the rest; recorded as FALLBACK in the split text (not the reference images).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_class_count, read_split_list
from dynammo.data.datasets.folder import is_image
from dynammo.data.datasets.medical import FALLBACK_SEED, list_md5_status, missing_text, seeded_class_split
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

CLASS_NAMES = [
    "Stasis_Ulcer", "Actinic_solar_Damage(Solar_Elastosis)", "Congenital_Nevus", "Inverse_Psoriasis",
    "Perioral_Dermatitis", "Stasis_Dermatitis", "Pyogenic_Granuloma", "Malignant_Melanoma",
    "Steroid_Use_abusemisuse_Dermatitis", "Sebaceous_Gland_Hyperplasia", "Rhinophyma", "Seborrheic_Dermatitis",
    "Psoriasis", "Onychomycosis", "Tinea_Versicolor", "Tinea_Corporis", "Alopecia_Areata",
    "Actinic_solar_Damage(Pigmentation)", "Blue_Nevus", "Keratoacanthoma", "Acne_Vulgaris", "Cutaneous_Horn",
    "Tinea_Pedis", "Stasis_Edema", "Dyshidrosiform_Eczema", "Skin_Tag", "Seborrheic_Keratosis", "Ichthyosis",
    "Actinic_solar_Damage(Actinic_Keratosis)", "Nevus_Incipiens", "Tinea_Faciale", "Epidermoid_Cyst",
    "Compound_Nevus", "Eczema", "Pityrosporum_Folliculitis", "Dysplastic_Nevus", "Allergic_Contact_Dermatitis",
    "Basal_Cell_Carcinoma", "Tinea_Manus", "Dermatofibroma",
]  # the reference lists' labels 0..39
LIST_PAIRS = (("main_classes_split/train_1.txt", "main_classes_split/val_1.txt"),
              ("skin40_train.txt", "skin40_test.txt"))
# md5 of CL_Pytorch's skin40_train.txt / skin40_test.txt: (as shipped, CRLF) and (CR-stripped)
REFERENCE_MD5 = (("18494d781f8cf682e30671c302a0b92d", "d01893a0cc6757f86ddc027704f312fa"),
                 ("53c98a55a44992496adb0df3f548a784", "da719d67d3c9143c624b9b2c0738c758"))
TOP_NAMES = ("SD-198", "SD198", "sd-198", "sd198")
SOURCE = "the SD-198 project page http://cv.nankai.edu.cn/projects/SD-198/ (request form, research use)"
LAYOUT = "SD-198/images/<Class_Name>/*.jpg + SD-198/main_classes_split/{train_1,val_1}.txt (seeded fallback without)"


def find_lists(top: Path) -> Optional[Tuple[Path, Path]]:
    for train_rel, test_rel in LIST_PAIRS:
        train, test = top / train_rel, top / test_rel
        if train.is_file() and test.is_file():
            return train, test
        if train.is_file() or test.is_file():
            have, lack = (train, test) if train.is_file() else (test, train)
            raise UserError(f"found {have} but not {lack}; put both SKIN40 lists there, or neither to use the "
                            "seeded fallback split")
    return None


def check_labels(rows: List[Tuple[str, int]], images: Path, path: Path) -> None:
    for full, label in rows:
        rel = Path(full).relative_to(images)
        if not 0 <= label < len(CLASS_NAMES):
            raise UserError(f"{path} labels {rel.as_posix()} {label}, not one of 0..39; use the SKIN40 lists")
        if rel.parts[0] != CLASS_NAMES[label]:
            raise UserError(f"{path} labels {rel.as_posix()} {label}, which is {CLASS_NAMES[label]} in the reference "
                            f"order, but the file is in folder {rel.parts[0]}; fix the list")


@dataset("skin40", LAYOUT, aliases=("sd198", "sd-198"), shape=DatasetShape(len(CLASS_NAMES), 3, None))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    top = next((t for t in [root / n for n in TOP_NAMES] + [root] if (t / "images").is_dir()), None)
    if top is None:
        raise UserError(f"SKIN40 (SD-198) not found under {root}: expected {LAYOUT}; get SD-198 from {SOURCE} and "
                        "set data_root to the folder holding SD-198/ (or to SD-198/ itself)")
    images = top / "images"
    lists = find_lists(top)
    if lists is not None:
        parts = [read_split_list(p, images) for p in lists]
        for p, rows in zip(lists, parts):
            check_labels(rows, images, p)
            check_class_count("SKIN40", len({y for _, y in rows}), len(CLASS_NAMES), p)
        status = [list_md5_status(p, ref) for p, ref in zip(lists, REFERENCE_MD5)]
        names = f"{lists[0].name}/{lists[1].name}"
        split = (f"reference lists {names} (md5 = CL_Pytorch's skin40_train/test.txt"
                 f"{', CR-stripped' if 'LF' in status else ''})" if all(status) else
                 f"OTHER lists {names}: md5 differs from CL_Pytorch's skin40_train/test.txt, so this may not be "
                 "the reference split")
        mk = lambda rows: ImageSet(np.asarray([y for _, y in rows], dtype=np.int64), sources=[f for f, _ in rows],
                                   channels=3, size=cfg.img_size)
        return RawDataset("skin40", list(CLASS_NAMES), mk(parts[0]), mk(parts[1]), flip=True, split=split)
    missing = [c for c in CLASS_NAMES if not (images / c).is_dir()]
    if missing:
        raise UserError(f"SKIN40 fallback (no lists in {top}/main_classes_split/) needs all 40 class folders in "
                        f"{images}; {len(missing)} missing: {missing_text(missing)}")
    files_by_class = []
    for c in CLASS_NAMES:
        files = [str(p) for p in (images / c).iterdir() if p.is_file() and is_image(p.name)]
        if len(files) < 2:
            raise UserError(f"class folder {images / c} holds {len(files)} image(s); a class needs at least 2 "
                            "(one train, one test)")
        files_by_class.append(files)
    tr_p, tr_l, te_p, te_l = seeded_class_split(files_by_class, lambda k: max(1, k // 6), FALLBACK_SEED)
    mk = lambda p, l: ImageSet(l, sources=p, channels=3, size=cfg.img_size)
    return RawDataset("skin40", list(CLASS_NAMES), mk(tr_p, tr_l), mk(te_p, te_l), flip=True,
                      split=f"FALLBACK (main_classes_split lists absent): per class sorted files permuted with seed "
                            f"{FALLBACK_SEED}, test=floor(n/6) (10 of 60) — not the reference images")
