"""ImageNet-1K (ILSVRC2012; Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge",
IJCV 2015) and the ImageNet-100 subsets used in class-incremental learning.

imagenet1000, under `data_root/{ilsvrc2012,ILSVRC2012,imagenet,ImageNet}/` (or data_root itself, or
Kaggle's `ILSVRC/Data/CLS-LOC/`):
  `train/<wnid>/*.JPEG` (1000 wnid folders), and `val/` either re-organised as `val/<wnid>/*.JPEG` or
  the official FLAT `val/ILSVRC2012_val_00000001.JPEG ...`, labelled by
  - the devkit (`ILSVRC2012_devkit_t12/` extracted, or `ILSVRC2012_devkit_t12.tar.gz` read in place):
    `data/ILSVRC2012_validation_ground_truth.txt` gives line k -> the ILSVRC2012_ID (1..1000) of
    ILSVRC2012_val_<k>; `data/meta.mat` maps ILSVRC2012_IDs to wnids. Those IDs are NOT sorted-wnid
    indices (ID 1 is n02119789, the first sorted wnid n01440764 is ID 449);
  - or Kaggle's `LOC_val_solution.csv` (ImageId,PredictionString; the first token is the wnid).
  When only the official tars are there, the error says how to extract them (the md5 of each tar up
  to MD5_CHECK_MAX_BYTES is checked first; the train tar's md5 is named for `md5sum`).
imagenet100 (in this order of precedence; the split text names which one ran):
  (a) CL_Pytorch's `miniImageNet/{train.txt,val.txt}`: `<relpath> <label>` lines, paths relative to
      miniImageNet/ with or without a leading '/' (CL_Pytorch joins them with no separator, so only
      '/'-led lines work there: both work here). Ids = the lists' labels.
  (b) PODNet's `train_100.txt` / `val_100.txt` (in data_root, its ImageNet folder or `imagenet_split/`),
      paths relative to the ImageNet root (`train/<wnid>/...`, `val/<wnid>/...`); their labels are the
      sorted index of the first 100 wnids. Ids = the lists' labels.
  (c) ImageFolder `imagenet100/{train,val}/<wnid>/` (also `ImageNet100`, `imagenet-100`, and UCIR's
      `seed_1993_subset_100_imagenet/data/`). Ids = sorted wnids.

Class ids: sorted wnids (ImageFolder order, the CIL convention: PODNet's val_1000.txt confirms it);
a list's labels where the list gives them. Class names are the wnids. The split is the official one
(train / val). Natural images are decoded as RGB (a few ImageNet JPEGs are CMYK or grayscale) and stay
file-backed (lazily decoded). Documented class counts are checked: 1000 and 100.
"""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import (check_class_count, check_member, missing_files_error, md5sum,
                                         read_split_list)
from dynammo.data.datasets.folder import by_split_role, entries, pre_split_rgb_dataset, scan_class_folders
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

NUM_CLASSES = 1000
NUM_CLASSES_100 = 100
TOP_NAMES = ("ilsvrc2012", "ILSVRC2012", "imagenet", "ImageNet", "ILSVRC/Data/CLS-LOC")
SUBSET_TOPS = ("imagenet100", "ImageNet100", "imagenet-100", "imagenet_100", "seed_1993_subset_100_imagenet/data",
               "seed_1993_subset_100_imagenet")
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
KAGGLE_VAL = "LOC_val_solution.csv"
SOURCE = "https://image-net.org/download-images.php (ILSVRC2012, after registering)"
ARCHIVES = {  # datasets.md §2
    "ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
    "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
    "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf",
}
MD5_CHECK_MAX_BYTES = 8 * 1024**3  # the 147 GB train tar is not hashed on an error path; its md5 is named


def file_set(labels, paths: Sequence[str], cfg) -> ImageSet:
    return ImageSet(np.asarray(labels, dtype=np.int64), sources=list(paths), channels=3, size=cfg.img_size)


# ---------------------------------------------------------------- ImageNet-1K


def unextracted_error(root: Path, found: Dict[Path, str]) -> UserError:
    """The official tars are there but not extracted: check their md5 (the affordable ones), say how."""
    unchecked = []
    for path, md5 in found.items():
        if path.stat().st_size <= MD5_CHECK_MAX_BYTES:
            got = md5sum(path)
            if got != md5:
                return UserError(f"{path} has md5 {got}, expected {md5}: it is corrupt or not the official file; "
                                 f"delete it and get it again from {SOURCE}")
        else:
            unchecked.append(f"{path.name} md5 should be {md5}")
    check = f" (not hashed here: {'; '.join(unchecked)})" if unchecked else ""
    return UserError(f"ImageNet-1K archives {', '.join(p.name for p in found)} in {root} are not extracted{check}: "
                     f"extract ILSVRC2012_img_train.tar into {root}/ilsvrc2012/train/ and each inner n<wnid>.tar there "
                     "into train/<wnid>/, and ILSVRC2012_img_val.tar into ilsvrc2012/val/ (flat is fine with "
                     "ILSVRC2012_devkit_t12.tar.gz kept beside it)")


def find_top(root: Path) -> Path:
    for cand in [root / t for t in TOP_NAMES] + [root]:
        if (cand / "train").is_dir():
            return cand
    found = {p: md5 for name, md5 in ARCHIVES.items() for d in [root] + [root / t for t in TOP_NAMES[:4]]
             if (p := d / name).is_file()}
    if found:
        raise unextracted_error(root, found)
    raise UserError(f"ImageNet-1K not found under {root}: expected ilsvrc2012/train/<wnid>/*.JPEG and ilsvrc2012/val/; "
                    f"set data_root to the folder that holds ilsvrc2012/ (or to it), get the data from {SOURCE}")


def scan_train(train: Path) -> Tuple[List[str], List[str], np.ndarray]:
    dirs, _ = entries(train)
    tars = sorted(p.name for p in train.glob("n*.tar"))
    if tars and not dirs:
        raise UserError(f"{train} holds {len(tars)} class tars ({tars[0]}, ...) not extracted: extract each "
                        f"n<wnid>.tar into {train}/<wnid>/ (e.g. mkdir n01440764 && tar -xf n01440764.tar -C n01440764)")
    return scan_class_folders(train)


def devkit_files(places: Sequence[Path]) -> Optional[Tuple[str, bytes, bytes]]:
    """(where, ground-truth text, meta.mat bytes) from an extracted devkit or its tar.gz, or None."""
    for d in places:
        kit = d / DEVKIT
        if (kit / GROUND_TRUTH).is_file():
            if not (kit / META).is_file():
                raise UserError(f"{kit} lacks {META}; extract {DEVKIT}.tar.gz again")
            return str(kit), (kit / GROUND_TRUTH).read_bytes(), (kit / META).read_bytes()
    for d in places:
        archive = d / f"{DEVKIT}.tar.gz"
        if archive.is_file():
            md5 = ARCHIVES[archive.name]
            if md5sum(archive) != md5:
                raise UserError(f"{archive} has the wrong md5 (expected {md5}): it is corrupt or not the official "
                                f"devkit; get it again from {SOURCE}")
            try:
                with tarfile.open(archive, "r:*") as tar:
                    got = {}
                    for m in tar:
                        check_member(archive, m.name, "ImageNet devkit")
                        for key in (GROUND_TRUTH, META):
                            if m.isfile() and m.name.endswith(key):
                                got[key] = tar.extractfile(m).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise UserError(f"{archive} is corrupt ({exc.__class__.__name__}); get it again from {SOURCE}") from exc
            if len(got) < 2:
                raise UserError(f"{archive} lacks {DEVKIT}/{GROUND_TRUTH} or {META}; get the official devkit from {SOURCE}")
            return str(archive), got[GROUND_TRUTH], got[META]
    return None


def id_to_wnid(meta: bytes, where: str) -> Dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf synsets of meta.mat (num_children == 0)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        fields = synsets.dtype.names or ()
        if "ILSVRC2012_ID" not in fields or "WNID" not in fields:
            raise KeyError("ILSVRC2012_ID/WNID")
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)
                if "num_children" not in fields or int(s["num_children"]) == 0}
    except Exception as exc:  # a garbled .mat raises many kinds of error
        raise UserError(f"{where}: {META} cannot be read as the devkit's synsets ({exc.__class__.__name__}); "
                        f"get the official devkit from {SOURCE}") from exc


def devkit_labels(where: str, truth: bytes, meta: bytes) -> Dict[str, str]:
    """{'ILSVRC2012_val_00000001': wnid, ...} from the devkit's ground truth."""
    wnid_of = id_to_wnid(meta, where)
    out = {}
    for k, line in enumerate(truth.decode("ascii", errors="replace").split(), 1):
        if not line.isdigit() or int(line) not in wnid_of:
            raise UserError(f"{where}: {GROUND_TRUTH} line {k} is {line[:20]!r}, not an ILSVRC2012_ID of {META}; "
                            f"get the official devkit from {SOURCE}")
        out[f"ILSVRC2012_val_{k:08d}"] = wnid_of[int(line)]
    return out


def kaggle_labels(path: Path) -> Dict[str, str]:
    out = {}
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read as UTF-8 text ({exc.__class__.__name__}); get the file again") from None
    with io.StringIO(text, newline="") as fh:
        for k, row in enumerate(csv.reader(fh), 1):
            if k == 1 and row and row[0].strip() == "ImageId":
                continue
            if not row:
                continue
            tokens = row[1].split() if len(row) >= 2 else []
            if not tokens or not tokens[0].startswith("n"):
                raise UserError(f"{path} line {k} must be ImageId,PredictionString (first token the wnid), got {str(row)[:100]}")
            out[row[0].strip()] = tokens[0]
    return out


def flat_val(top: Path, root: Path, val: Path, names: List[str]) -> Tuple[List[str], List[int], str]:
    """Paths and labels of the flat official val/ folder, and what labelled it."""
    places = list(dict.fromkeys([top, *[p for p in top.parents if p == root or root in p.parents], root]))
    kit = devkit_files(places)
    kaggle = next((d / KAGGLE_VAL for d in places if (d / KAGGLE_VAL).is_file()), None)
    if kit is not None:
        labels, source, listing = devkit_labels(*kit), f"the devkit's ground truth ({Path(kit[0]).name})", Path(kit[0])
    elif kaggle is not None:
        labels, source, listing = kaggle_labels(kaggle), KAGGLE_VAL, kaggle
    else:
        raise UserError(f"{val} is the official flat folder, but no labels were found: put {DEVKIT}.tar.gz (md5 "
                        f"{ARCHIVES[DEVKIT + '.tar.gz']}) or Kaggle's {KAGGLE_VAL} in {top}, or re-organise val/ "
                        "into val/<wnid>/ folders")
    files = {Path(n).stem: n for n in entries(val)[1]}
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled:
        raise UserError(f"{val} holds {len(unlabelled)} image(s) {source} does not label ({', '.join(unlabelled[:3])}); "
                        "remove them or use the official val images")
    missing = sorted(set(labels) - set(files))
    if missing:
        raise missing_files_error(listing, [f"val/{m}.JPEG" for m in missing], top)
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({w for w in labels.values() if w not in index})
    if unknown:
        raise UserError(f"{source} labels val images with wnids that train/ lacks ({', '.join(unknown[:3])}); "
                        "train/ is incomplete")
    stems = sorted(files)
    return [str(val / files[s]) for s in stems], [index[labels[s]] for s in stems], f"flat val/ labelled by {source}"


@dataset("imagenet1000", "data_root/ilsvrc2012/train/<wnid>/*.JPEG + val/<wnid>/*.JPEG, or flat val/ with "
                         "ILSVRC2012_devkit_t12(.tar.gz) or LOC_val_solution.csv", aliases=("imagenet1k", "imagenet", "ilsvrc2012"),
         shape=DatasetShape(NUM_CLASSES, 3, None))
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    top = find_top(root)
    names, train_paths, train_labels = scan_train(top / "train")
    check_class_count("ImageNet-1K", len(names), NUM_CLASSES, top / "train")
    val = top / "val"
    if not val.is_dir():
        raise UserError(f"{top} lacks val/; extract ILSVRC2012_img_val.tar (md5 {ARCHIVES['ILSVRC2012_img_val.tar']}) "
                        f"into {val}")
    dirs, images = entries(val)
    if images:
        if dirs:
            raise UserError(f"{val} mixes images and wnid folders ({dirs[0]}/); keep it flat or fully re-organised")
        val_paths, val_labels, how = flat_val(top, root, val, names)
    else:
        val_names, val_paths, val_labels = scan_class_folders(val)
        if val_names != names:
            extra = sorted(set(val_names) - set(names)) or sorted(set(names) - set(val_names))
            raise UserError(f"{val} and {top / 'train'} have different wnid folders (e.g. {', '.join(extra[:3])}); "
                            "make them the same")
        how = "val/<wnid>/ folders"
    return RawDataset("imagenet1000", names, file_set(train_labels, train_paths, cfg), file_set(val_labels, val_paths, cfg),
                      split=f"official train/ and {how} as the test split")


# ---------------------------------------------------------------- ImageNet-100


def rows_set(rows: List[Tuple[str, int]], cfg) -> ImageSet:
    return file_set([r[1] for r in rows], [r[0] for r in rows], cfg)


def list_class_names(train: List[Tuple[str, int]], listing: Path) -> List[str]:
    """Class names of a list's labels 0..n-1: the folder holding each label's train images (its wnid)."""
    labels = sorted({y for _, y in train})
    if labels != list(range(len(labels))):
        raise UserError(f"{listing} labels must be 0..{len(labels) - 1}, got {labels[0]}..{labels[-1]} with gaps; "
                        "use an unmodified list")
    parents: Dict[int, set] = {}
    for path, y in train:
        parents.setdefault(y, set()).add(Path(path).parent.name)
    names = [next(iter(parents[y])) if len(parents[y]) == 1 else f"class_{y:03d}" for y in labels]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{listing} gives folder {dup} two labels; use an unmodified list")
    return names


def from_lists(train_list: Path, test_list: Path, base: Path, cfg, what: str) -> RawDataset:
    train, test = read_split_list(train_list, base), read_split_list(test_list, base)
    names = list_class_names(train, train_list)
    bad = sorted({y for _, y in test if not 0 <= y < len(names)})
    if bad:
        raise UserError(f"{test_list} has label {bad[0]}, which {train_list.name} does not; use matching lists")
    check_class_count("ImageNet-100", len(names), NUM_CLASSES_100, train_list)
    return RawDataset("imagenet100", names, rows_set(train, cfg), rows_set(test, cfg),
                      split=f"{what} {train_list.name} (train) and {test_list.name} (test) in {train_list.parent}")


def podnet_base(list_dir: Path, root: Path, first_rel: str) -> Path:
    """The folder the PODNet list's paths are relative to (the ImageNet root)."""
    cands = [list_dir, list_dir.parent, *[root / t for t in TOP_NAMES], root]
    return next((c for c in cands if (c / first_rel).is_file()), list_dir)


def first_path(listing: Path) -> str:
    with listing.open("rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                return line.rsplit(None, 1)[0].lstrip("/")
    return ""


@dataset("imagenet100", "data_root/miniImageNet/{train,val}.txt, PODNet's train_100.txt/val_100.txt, or "
                        "data_root/imagenet100/{train,val}/<wnid>/", aliases=("imagenet_100", "imagenet-100"),
         shape=DatasetShape(NUM_CLASSES_100, 3, None))
def load100(cfg, root, seed) -> RawDataset:
    root = Path(root)
    for d in (root / "miniImageNet", root):  # (a) CL_Pytorch's lists
        if (d / "train.txt").is_file() or (d / "val.txt").is_file():
            return from_lists(d / "train.txt", d / "val.txt", d, cfg, "CL_Pytorch lists")
    for d in (root, root / "imagenet_split", *[root / t for t in TOP_NAMES],  # (b) PODNet's lists
              *[root / t / "imagenet_split" for t in TOP_NAMES]):
        if (d / "train_100.txt").is_file() or (d / "val_100.txt").is_file():
            base = podnet_base(d, root, first_path(d / "train_100.txt") if (d / "train_100.txt").is_file() else "")
            return from_lists(d / "train_100.txt", d / "val_100.txt", base, cfg, "PODNet lists")
    for top in [root / t for t in SUBSET_TOPS] + [root]:  # (c) ImageFolder
        if not top.is_dir():
            continue
        found = by_split_role(entries(top)[0])
        if "train" in found:
            return pre_split_rgb_dataset("imagenet100", "ImageNet-100", top, found, NUM_CLASSES_100, cfg,
                                         "add the ImageNet val images of the 100 classes as val/<wnid>/", "ImageFolder")
    raise UserError(f"ImageNet-100 not found under {root}: expected miniImageNet/{{train,val}}.txt, PODNet's "
                    "train_100.txt/val_100.txt beside the ImageNet train/ and val/ folders, or "
                    "imagenet100/{train,val}/<wnid>/; set data_root to the folder that holds one of them")
