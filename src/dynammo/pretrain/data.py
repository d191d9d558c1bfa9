"""The images of a pretraining run (labels ignored) and the labeled split of its k-NN monitor.

Sources:
- a registered dataset (`dataset`, `data_root`): by default its training split under `seed`, made
  exactly as `dynammo run` makes it (same loader, same seeded split, same test_fraction), so the
  images a continual run tests on are never seen. Held out as well: the test split of every seed
  of `ssl_holdout_seeds` (default: every seed of a seed list), and the classes of
  `ssl_exclude_classes`. An image is held out when its file name or its content (the decoded
  array's or the encoded file's bytes) matches a held-out one, so an exact duplicate of a test image
  (MedNIST has about 440) is held out with it.
- `ssl_folder: PATH`: every image file under PATH at any depth (hidden files and folders skipped,
  sorted paths), no class folders needed.

`ssl_max_images` takes a seeded uniform subsample. The images used are listed in the run's
images.csv (file name or split index, class name when known, sha1 of the content).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from dynammo.configure import build_config
from dynammo.data import fit_in_memory
from dynammo.data import normalisation as data_normalisation
from dynammo.data.datasets import DATASETS, RawDataset
from dynammo.data.datasets.folder import IMAGE_EXTENSIONS, guess_channels, is_image
from dynammo.data.imageset import ImageSet, subsample_per_class
from dynammo.errors import UserError
from dynammo.pretrain.config import holdout_seeds, run_seed

# the keys a dataset loader reads; the rest of its config is the framework's defaults
LOADER_KEYS = ("dataset", "data_root", "img_size", "test_fraction", "download", "in_memory", "num_workers",
               "batch_size", "eval_batch_size", "backbone")


@dataclass
class KnnSplit:
    """The labeled images of the k-NN monitor: a memory bank (training split) and the queries (test split)."""
    bank: ImageSet
    test: ImageSet
    class_names: List[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class PretrainData:
    images: ImageSet  # the pretraining images (decoded and resized when they fit in memory)
    records: List[tuple]  # per image: (image, class name or "", sha1 of its content or "")
    description: str  # where they come from, in words (log, pretrain.json)
    mean: tuple
    std: tuple
    flip: bool  # whether a mirrored image is the same image (the dataset's flag; True for a folder)
    knn: Optional[KnnSplit]
    selection: dict = field(default_factory=dict)  # counts: pool, held out, excluded, used


def loader_config(cfg):
    """A framework config holding the pretraining's data keys (a dataset loader reads a few more
    keys, at their defaults); no per-class subsampling."""
    return build_config({k: cfg[k] for k in LOADER_KEYS})


def normalisation(cfg, images: ImageSet, seed: int):
    """(mean, std): auto is the statistics of the backbone family's pretrained weights (ImageNet's;
    EfficientNet-Lite: 0.5), what `dynammo run pretrained: PATH` normalises with."""
    return data_normalisation(cfg.normalize, cfg.backbone, True, images, seed)


def prepare(images: ImageSet, cfg, what: str) -> ImageSet:
    """Decode into memory when it fits (in_memory), resize to img_size (as load_data does)."""
    return fit_in_memory(cfg, what, images, images.subset(torch.zeros(0, dtype=torch.long)), "ssl_max_images")[0]


def source_name(images: ImageSet, i: int, split: str) -> str:
    if images.in_memory:
        return f"{split}[{i}]"
    src = images.sources[i]
    return src[0] if isinstance(src, tuple) else (src if isinstance(src, str) else f"{split}[{i}]")


def content_digest(images: ImageSet, i: int) -> str:
    """sha1 of an image's content: its uint8 array in memory, its encoded bytes from an archive
    ('' for a file on disk: reading every file to compare is left to the names)."""
    if images.in_memory:
        return hashlib.sha1(images.images[i].contiguous().numpy().tobytes()).hexdigest()
    src = images.sources[i]
    data = src[1] if isinstance(src, tuple) else (src if isinstance(src, bytes) else None)
    return hashlib.sha1(data).hexdigest() if data is not None else ""


def identities(images: ImageSet, split: str):
    return [source_name(images, i, split) for i in range(len(images))], [content_digest(images, i) for i in range(len(images))]


def _seeded_subset(n: int, limit: Optional[int], seed: int) -> torch.Tensor:
    if limit is None or n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _class_ids(names: Sequence[str], class_names: List[str], dataset: str) -> List[int]:
    ids = []
    for name in names:
        if name in class_names:
            ids.append(class_names.index(name))
        elif str(name).isdigit() and int(name) < len(class_names):
            ids.append(int(name))
        else:
            raise UserError(f"ssl_exclude_classes names '{name}', which is not a class of {dataset} "
                            f"({', '.join(class_names[:20])}); give class names or ids 0..{len(class_names) - 1}")
    return ids


def load_raw(name: str, cfg, seed: int) -> RawDataset:
    raw = DATASETS.get(name)(loader_config(cfg), Path(cfg.data_root), seed)
    if len(raw.train) == 0:
        raise UserError(f"dataset {raw.name} has no training images; check data_root")
    return raw


def knn_split(raw: RawDataset, cfg, seed: int) -> KnnSplit:
    bank = raw.train.subset(subsample_per_class(raw.train.labels, cfg.knn_bank_per_class, seed))
    test = raw.test.subset(subsample_per_class(raw.test.labels, cfg.knn_test_per_class, seed + 1))
    if len(test) == 0:
        raise UserError(f"dataset {raw.name} has no test images for the k-NN monitor; set knn_dataset=none")
    bank, test = prepare(bank, cfg, f"{raw.name} (k-NN bank)"), prepare(test, cfg, f"{raw.name} (k-NN test)")
    channels = max(bank.channels, test.channels)
    text = (f"{raw.name}: {len(bank)} training images (at most {cfg.knn_bank_per_class} per class) as the bank, "
            f"{len(test)} test images (at most {cfg.knn_test_per_class} per class) classified, split of seed {seed}")
    return KnnSplit(bank.to_channels(channels), test.to_channels(channels), list(raw.class_names), text)


def from_dataset(cfg, seed: int) -> PretrainData:
    name = DATASETS.canonical(cfg.dataset)
    raw = load_raw(name, cfg, seed)
    pool = raw.train if cfg.ssl_images == "train" else ImageSet.concat([raw.train, raw.test])
    splits = ["train"] * len(raw.train) + (["test"] * len(raw.test) if cfg.ssl_images == "all" else [])
    offsets = [0] * len(raw.train) + ([len(raw.train)] * len(raw.test) if cfg.ssl_images == "all" else [])
    names = [f"{s}[{i - o}]" if pool.in_memory else source_name(pool, i, s)
             for i, (s, o) in enumerate(zip(splits, offsets))]
    digests = [content_digest(pool, i) for i in range(len(pool))]
    keep = np.ones(len(pool), dtype=bool)
    selection = {"pool": len(pool)}
    held = holdout_seeds(cfg) if cfg.ssl_images == "train" else list(cfg.ssl_holdout_seeds or [])
    others = [s for s in held if s != seed or cfg.ssl_images == "all"]
    if others:
        bad_names, bad_digests = set(), set()
        for s in others:
            test = raw.test if s == seed else load_raw(name, cfg, s).test
            n, d = identities(test, "test")
            bad_names.update(n if not test.in_memory else [])
            bad_digests.update(x for x in d if x)
        out = np.array([(nm in bad_names) or (dg in bad_digests) for nm, dg in zip(names, digests)], dtype=bool)
        selection["held_out_test_of_seeds"] = {"seeds": others, "images": int((keep & out).sum())}
        keep &= ~out
    if cfg.ssl_exclude_classes:
        ids = _class_ids(cfg.ssl_exclude_classes, list(raw.class_names), name)
        out = np.isin(pool.labels.numpy(), ids)
        selection["excluded_classes"] = {"classes": [raw.class_names[i] for i in ids], "images": int((keep & out).sum())}
        keep &= ~out
    idx = torch.from_numpy(np.flatnonzero(keep))
    if len(idx) == 0:
        raise UserError(f"no images of {name} are left to pretrain on after the held-out seeds and excluded classes; "
                        "hold out fewer")
    idx = idx[_seeded_subset(len(idx), cfg.ssl_max_images, seed)]
    selection["used"] = len(idx)
    images = prepare(pool.subset(idx), cfg, f"{name} (pretraining images)")
    records = [(names[i], raw.class_names[int(pool.labels[i])], digests[i]) for i in idx.tolist()]
    what = "training split" if cfg.ssl_images == "train" else "training and test splits"
    text = f"{name}: {len(images)} images of its {what} under seed {seed} ({raw.split})"
    if "held_out_test_of_seeds" in selection:
        h = selection["held_out_test_of_seeds"]
        text += f", minus {h['images']} in the test split of seed(s) {', '.join(map(str, h['seeds']))}"
    if "excluded_classes" in selection:
        e = selection["excluded_classes"]
        text += f", minus {e['images']} of the classes {', '.join(e['classes'])}"
    if cfg.ssl_max_images is not None and selection["used"] < int(keep.sum()):
        text += f", a seeded subsample of {selection['used']} of {int(keep.sum())}"
    knn = None
    if cfg.knn_dataset == "auto" or cfg.knn_dataset == name:
        knn = knn_split(raw, cfg, seed)
    elif cfg.knn_dataset != "none":
        knn = knn_split(load_raw(cfg.knn_dataset, cfg, seed), cfg, seed)
    mean, std = normalisation(cfg, images, seed)
    return PretrainData(images, records, text, mean, std, raw.flip, knn, selection)


def folder_images(root: Path) -> List[str]:
    """Sorted paths of every image under root at any depth (hidden files and folders skipped)."""
    if not root.is_dir():
        raise UserError(f"ssl_folder {root} does not exist or is not a folder; give the folder holding the images")
    paths = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or not is_image(p.name) or not p.is_file():
            continue
        paths.append(str(p))
    if not paths:
        raise UserError(f"ssl_folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) at any depth; "
                        "point it at the folder of your images")
    return sorted(paths)


def from_folder(cfg, seed: int) -> PretrainData:
    root = Path(cfg.ssl_folder)
    paths = folder_images(root)
    channels = guess_channels(paths)
    pool = ImageSet(torch.zeros(len(paths), dtype=torch.long), sources=paths, channels=channels, size=cfg.img_size)
    idx = _seeded_subset(len(pool), cfg.ssl_max_images, seed)
    images = prepare(pool.subset(idx), cfg, f"ssl_folder {root}")
    records = [(str(Path(paths[i]).relative_to(root)), "", "") for i in idx.tolist()]
    text = f"ssl_folder {root}: {len(images)} images" + (f" (a seeded subsample of {len(paths)})"
                                                         if len(idx) < len(paths) else "")
    knn = None
    if cfg.knn_dataset not in ("auto", "none"):
        knn = knn_split(load_raw(cfg.knn_dataset, cfg, seed), cfg, seed)
    mean, std = normalisation(cfg, images, seed)
    return PretrainData(images, records, text, mean, std, True, knn, {"pool": len(paths), "used": len(idx)})


def load_pretrain_data(cfg) -> PretrainData:
    seed = run_seed(cfg)
    data = from_folder(cfg, seed) if cfg.ssl_folder is not None else from_dataset(cfg, seed)
    if data.knn is not None and data.knn.bank.channels != data.images.channels:  # grayscale repeated as RGB
        channels = max(data.knn.bank.channels, data.images.channels)
        data.images = data.images.to_channels(channels)
        data.knn = KnnSplit(data.knn.bank.to_channels(channels), data.knn.test.to_channels(channels),
                            data.knn.class_names, data.knn.description)
        data.mean, data.std = normalisation(cfg, data.images, seed)
    if data.knn is not None and data.knn.bank.size != data.images.size:
        raise UserError(f"the k-NN monitor's images are {data.knn.bank.size} px, the pretraining images "
                        f"{data.images.size} px; set img_size=N")
    return data
