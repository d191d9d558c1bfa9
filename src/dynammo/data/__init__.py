"""Loading a dataset (or a dataset-per-task stream) into ready-to-train ImageSets."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from dynammo.data.datasets import DATASETS, RawDataset
from dynammo.data.imageset import ImageSet, set_max_image_pixels, subsample_per_class
from dynammo.errors import UserError, is_allocation_failure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# fixed statistics by name (`normalize: NAME`); "inception" (mean = std = 0.5, timm's name for it) is
# what the EfficientNet-Lite and Inception-style weights were trained with
FIXED_STATISTICS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5,) * 3, (0.5,) * 3),
                    "none": ((0.0,) * 3, (1.0,) * 3)}
WEIGHTS_STATISTICS = {"efficientnet_lite": "inception"}  # backbone name prefix -> its weights' statistics
IN_MEMORY_LIMIT_BYTES = 4 * 1024**3


def resolve_normalize(normalize: str, backbone: str, pretrained: bool) -> str:
    """`normalize: auto`: a pretrained backbone expects the statistics its weights were trained with
    (ImageNet's, or its family's in WEIGHTS_STATISTICS); a backbone trained here, the data's own."""
    if normalize != "auto":
        return normalize
    if not pretrained:
        return "dataset"
    return next((v for k, v in WEIGHTS_STATISTICS.items() if str(backbone).lower().startswith(k)), "imagenet")


def normalisation(normalize: str, backbone: str, pretrained: bool, images: ImageSet, seed: int):
    """(mean, std) per channel for a normalize choice; one value per channel of grayscale images."""
    mode = resolve_normalize(normalize, backbone, pretrained)
    if mode in FIXED_STATISTICS:
        mean, std = FIXED_STATISTICS[mode]
    else:
        mean, std = channel_stats(stats_sample(images, seed).images)
    if len(mean) == 3 and images.channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean), tuple(std)


@dataclass
class LoadedData:
    names: List[str]  # dataset name per stream part (one entry unless a dataset-per-task stream)
    class_names: List[str]
    train: ImageSet
    test: ImageSet
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool
    stream_sizes: Optional[List[int]] = None  # classes per dataset of a stream (one task each)
    splits: Optional[List[str]] = None  # how each part's train/test split was made

    def split_text(self) -> str:
        parts = self.splits or ["official"]
        if len(parts) == 1:
            return parts[0]
        return "; ".join(f"{n}: {s}" for n, s in zip(self.names, parts))

    def class_counts(self) -> List[Tuple[str, int, int]]:
        """(class name, training images, test images) per class id, after subsampling."""
        n = self.num_classes
        train = torch.bincount(self.train.labels, minlength=n).tolist()
        test = torch.bincount(self.test.labels, minlength=n).tolist()
        return list(zip(self.class_names, train, test))

    def describe_classes(self, limit: int = 40) -> str:
        """One line: each class with its train/test counts (the first `limit` of a large dataset)."""
        rows = self.class_counts()
        text = ", ".join(f"{name} {tr}/{te}" for name, tr, te in rows[:limit])
        more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
        return f"classes (train/test images): {text}{more}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


STATS_IMAGES = 5000  # images the normalisation statistics are computed on (1000 when decoded from files)


def stats_sample(train: ImageSet, seed: int) -> ImageSet:
    """A seeded uniform sample of the training set for the normalisation statistics: spread over
    every class (training sets are sorted by class, so their first images are one class)."""
    n = min(len(train), STATS_IMAGES if train.in_memory else STATS_IMAGES // 5)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    sample = train.subset(order)
    return sample if sample.in_memory else sample.materialize()


def channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    """Per-channel mean/std in [0, 1] of a uint8 (N, C, H, W) tensor."""
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _fits_memory(s: ImageSet, size: Optional[int]) -> bool:
    side = size or 256
    return len(s) * s.channels * side * side < IN_MEMORY_LIMIT_BYTES


def available_memory() -> int:
    """Bytes the process can still allocate: MemAvailable on Linux, else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2**62


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_image_memory(cfg, name: str, train: ImageSet, test: ImageSet, in_memory: bool) -> None:
    """img_size (with the batch sizes) must leave the resized images and one network batch
    allocatable: one line naming the key, before anything is written, instead of an allocator
    traceback (or the OOM killer) later."""
    side = cfg.img_size
    if side is None:
        return
    channels = max(train.channels, test.channels)
    stored = (len(train) + len(test)) * channels * side * side if in_memory else 0
    batch = min(max(cfg.batch_size, cfg.eval_batch_size), max(len(train), len(test), 1))
    batch_bytes = 2 * batch * 3 * side * side * 4  # the float input of the network and its augmented copy
    avail = available_memory()
    if stored + batch_bytes <= avail:
        return
    if stored >= batch_bytes:
        raise UserError(f"img_size={side} needs {_gib(stored)} to hold the {len(train) + len(test)} images of {name} "
                        f"in memory, more than the {_gib(avail)} available; lower img_size (or max_train_per_class)")
    raise UserError(f"img_size={side} with batch_size={cfg.batch_size} / eval_batch_size={cfg.eval_batch_size} needs "
                    f"{_gib(batch_bytes)} per batch, more than the {_gib(avail)} available; lower batch_size, "
                    "eval_batch_size or img_size")


def fit_in_memory(cfg, name: str, train: ImageSet, test: ImageSet, subsample_key: str) -> Tuple[ImageSet, ImageSet]:
    """Decode into memory when the images fit (in_memory), resize to img_size; an allocation that
    fails is one line naming img_size and the key that subsamples (`subsample_key`)."""
    mode = cfg.in_memory
    keep = mode == "true" or (mode == "auto" and _fits_memory(train, cfg.img_size) and _fits_memory(test, cfg.img_size))
    check_image_memory(cfg, name, train, test, keep or train.in_memory)
    def fit(images: ImageSet) -> ImageSet:
        if not len(images):  # nothing to decode (the pretraining images have no test set)
            return images
        if keep:
            images = images.materialize()
        return images.resized(cfg.img_size) if cfg.img_size is not None else images

    try:
        train, test = fit(train), fit(test)
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        raise UserError(f"the images of {name} at img_size={cfg.img_size} cannot be allocated "
                        f"({exc.__class__.__name__}); lower img_size or {subsample_key}") from None
    if cfg.img_size is None and not train.in_memory:
        raise UserError(f"the images of {name} are read from files lazily; set img_size=N so every image has one size")
    return train, test


def _prepare(raw: RawDataset, cfg, seed: int) -> RawDataset:
    """Subsample (before decoding), decode into memory when it fits, resize."""
    if len(raw.train) == 0:
        raise UserError(f"dataset {raw.name} has no training images; check data_root")
    if len(raw.test) == 0:
        raise UserError(f"dataset {raw.name} has no test images; lower test_fraction's rounding or add images")
    check_every_class_has_images(raw)
    train = raw.train.subset(subsample_per_class(raw.train.labels, cfg.max_train_per_class, seed))
    test = raw.test.subset(subsample_per_class(raw.test.labels, cfg.max_test_per_class, seed + 1))
    if cfg.get("keep_aspect"):  # before the resize to a square: the original height / width of each image
        train, test = train.with_aspect(), test.with_aspect()
    train, test = fit_in_memory(cfg, raw.name, train, test, "max_train_per_class")
    return RawDataset(raw.name, raw.class_names, train, test, raw.flip, raw.split)


def check_every_class_has_images(raw: RawDataset) -> None:
    """Every class needs a training and a test image, or its accuracy is a mean of nothing: refused
    before training, naming the class (a class of one image keeps it for training)."""
    n = len(raw.class_names)
    train = torch.bincount(raw.train.labels, minlength=n).tolist()
    test = torch.bincount(raw.test.labels, minlength=n).tolist()
    for role, counts in (("test", test), ("training", train)):
        missing = [i for i in range(n) if counts[i] == 0]
        if not missing:
            continue
        c = missing[0]
        more = f" (and {len(missing) - 1} more class(es))" if len(missing) > 1 else ""
        held = train[c] + test[c]
        raise UserError(f"class {raw.class_names[c]!r} of dataset {raw.name} has no {role} image{more}: "
                        f"{held} image(s) in all, split {raw.split}; every class needs at least one training and "
                        f"one test image: add images to it (2 or more without an official split) or remove it")


def load_one(name: str, cfg, seed: int, root) -> RawDataset:
    set_max_image_pixels(cfg.get("max_image_pixels"))  # before the loader opens any image
    raw = DATASETS.get(name)(cfg, Path(root), seed)
    return _prepare(raw, cfg, seed)


def load_data(cfg, seed: int) -> LoadedData:
    names = cfg.dataset if isinstance(cfg.dataset, list) else [cfg.dataset]
    parts = [load_one(n, cfg, seed, cfg.data_root) for n in names]
    stream = len(parts) > 1
    if stream:
        sizes = {p.train.size for p in parts}
        if len(sizes) > 1 and cfg.img_size is None:
            raise UserError(f"the datasets of the stream have different image sizes {sorted(sizes)}; set img_size=N")
        channels = max(p.train.channels for p in parts)
        offset, trains, tests, class_names = 0, [], [], []
        for p in parts:
            trains.append(p.train.to_channels(channels).with_labels(p.train.labels + offset))
            tests.append(p.test.to_channels(channels).with_labels(p.test.labels + offset))
            class_names += [f"{p.name}/{c}" for c in p.class_names]
            offset += len(p.class_names)
        train, test = ImageSet.concat(trains), ImageSet.concat(tests)
        flip = all(p.flip for p in parts)
    else:
        (p,) = parts
        train, test, class_names, flip = p.train, p.test, list(p.class_names), p.flip
    mean, std = normalisation(cfg.normalize, cfg.backbone, bool(cfg.pretrained), train, seed)
    present = torch.unique(train.labels).numel()
    if present != len(class_names):
        raise UserError(
            f"only {present} of {len(class_names)} classes have training images after splitting; "
            "add images or lower test_fraction"
        )
    return LoadedData(names, class_names, train, test, mean, std, flip,
                      [len(p.class_names) for p in parts] if stream else None, [p.split for p in parts])
