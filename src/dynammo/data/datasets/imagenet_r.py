"""ImageNet-R (Hendrycks et al., "The Many Faces of Robustness: A Critical Analysis of
Out-of-Distribution Generalization", ICCV 2021): 30,000 renditions (art, cartoons, sketches, ...) of
200 ImageNet classes.

Layouts, under `data_root/{imagenet-r,imagenet_r,imagenetr,ImageNet-R}/` (or data_root itself), in
this order of precedence (the split text says which one ran):
  1. CODA-Prompt's lists `imagenet-r_train.yaml` / `imagenet-r_test.yaml` in that folder (a YAML `data:`
     list of paths such as `data/imagenet-r/<wnid>/<file>` and a parallel `targets:` list): the fixed
     24,000 / 6,000 split. Paths are resolved by their last two components (`<wnid>/<file>`).
  2. Pre-split `train/<wnid>/` + `test/<wnid>/` folders (DualPrompt's random_split output, the layout
     PILOT and CL_Pytorch read): kept.
  3. The official `imagenet-r/<wnid>/<rendition>_<k>.jpg` (+ README.txt): there is no official split,
     so a seeded stratified split with cfg.test_fraction (default 0.2).
When none is there, `imagenet-r.tar` in data_root is md5-checked and extracted (safely); when it is
absent too it is downloaded from URL (unless `download: false`).

Class ids: sorted wnids, in every layout. CODA's `targets:` are a per-wnid map in another order
(target 0 is n02165456); they are checked for consistency but not used as ids, so a class order
(`class_order`, or shuffle with a seed) means the same classes whichever layout was read. The
documented 200 classes are checked. Images are decoded as RGB and stay file-backed.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Dict, List, Tuple


from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import (check_class_count, extract_archive, missing_files_error, obtain_archive)
from dynammo.data.datasets.imagenet import file_set
from dynammo.data.datasets.folder import by_split_role, entries, pre_split_rgb_dataset, scan_class_folders, split_role, split_sources
from dynammo.errors import UserError

NUM_CLASSES = 200
TOP_NAMES = ("imagenet-r", "imagenet_r", "imagenetr", "ImageNet-R")
ARCHIVE = "imagenet-r.tar"
URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
MD5 = "a61312130a589d0ca1a8fca1f2bd3337"
CODA_LISTS = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")
WNID = "n" + "[0-9]" * 8


def looks_like_top(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    dirs = entries(folder)[0]
    return (any((folder / n).is_file() for n in CODA_LISTS) or any(split_role(d) for d in dirs)
            or any(Path(d).match(WNID) for d in dirs))


def find_top(root: Path, allow_download: bool) -> Path:
    for cand in [root / t for t in TOP_NAMES] + [root]:
        if looks_like_top(cand):
            return cand
    archive = obtain_archive(root, ARCHIVE, URL, MD5, "ImageNet-R", allow_download,
                             expected=f"{root}/imagenet-r/<wnid>/*.jpg")
    extract_archive(archive, root, "ImageNet-R")
    if not looks_like_top(root / "imagenet-r"):
        raise UserError(f"{archive} did not hold imagenet-r/<wnid>/ folders; it is not the official archive: "
                        f"delete it and download {URL} (md5 {MD5}) again")
    return root / "imagenet-r"


def read_coda_list(path: Path, top: Path) -> List[Tuple[str, str, int]]:
    """-> [(file path, wnid, CODA target)] of one CODA-Prompt YAML list."""
    import yaml

    if not path.is_file():
        raise UserError(f"split list {path} does not exist; CODA-Prompt's lists come in pairs "
                        f"({' and '.join(CODA_LISTS)}): add it or remove the other one")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8", errors="replace"),
                        Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({exc.__class__.__name__}); use CODA-Prompt's unmodified list") from exc
    data = doc.get("data") if isinstance(doc, dict) else None
    targets = doc.get("targets") if isinstance(doc, dict) else None
    if not isinstance(data, list) or not isinstance(targets, list) or len(data) != len(targets) or not data:
        raise UserError(f"{path} must hold a 'data:' list of paths and a 'targets:' list of the same length; "
                        "use CODA-Prompt's unmodified list")
    rows, missing = [], []
    for rel, target in zip(data, targets):
        parts = PurePosixPath(str(rel).replace("\\", "/")).parts[-2:]
        if len(parts) != 2 or not isinstance(target, int):
            raise UserError(f"{path} entry {rel!r} -> {target!r} is not '<...>/<wnid>/<file>' with an integer target")
        full = top / parts[0] / parts[1]
        if not full.is_file():
            missing.append(f"{parts[0]}/{parts[1]}")
        rows.append((str(full), parts[0], target))
    if missing:
        raise missing_files_error(path, missing, top)
    return rows


def from_coda(top: Path, cfg) -> RawDataset:
    train, test = (read_coda_list(top / n, top) for n in CODA_LISTS)
    target_of: Dict[str, int] = {}
    wnid_of: Dict[int, str] = {}
    for _, wnid, target in train + test:
        if target_of.setdefault(wnid, target) != target or wnid_of.setdefault(target, wnid) != wnid:
            raise UserError(f"{top / CODA_LISTS[0]} and {CODA_LISTS[1]} give {wnid} or target {target} two meanings; "
                            "use CODA-Prompt's unmodified lists")
    names = sorted(target_of)
    check_class_count("ImageNet-R", len(names), NUM_CLASSES, top)
    index = {n: i for i, n in enumerate(names)}
    mk = lambda rows: file_set([index[w] for _, w, _ in rows], [p for p, _, _ in rows], cfg)
    return RawDataset("imagenet_r", names, mk(train), mk(test),
                      split=f"CODA-Prompt lists {CODA_LISTS[0]}/{CODA_LISTS[1]} (ids by sorted wnid, not their targets)")


@dataset("imagenet_r", "data_root/imagenet-r/<wnid>/*.jpg (seeded split), imagenet_r/{train,test}/<wnid>/, or "
                       "CODA-Prompt's imagenet-r_{train,test}.yaml (downloads imagenet-r.tar when missing)",
         aliases=("imagenet-r", "imagenetr"), shape=DatasetShape(NUM_CLASSES, 3, None))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    top = find_top(root, bool(cfg.get("download", True)))
    if any((top / n).is_file() for n in CODA_LISTS):
        return from_coda(top, cfg)
    found = by_split_role(entries(top)[0])
    if found:
        return pre_split_rgb_dataset("imagenet_r", "ImageNet-R", top, found, NUM_CLASSES, cfg,
                                     "add it, or use the official imagenet-r/<wnid>/ folders (split here by seed)",
                                     "pre-split")
    names, paths, labels = scan_class_folders(top)
    check_class_count("ImageNet-R", len(names), NUM_CLASSES, top)
    return split_sources("imagenet_r", names, paths, labels, cfg, seed, channels=3,
                         note=f"official {top.name}/<wnid>/ folders, which have no official split")
