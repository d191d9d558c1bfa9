"""Loading a dataset (or a dataset-per-task stream) into ready-to-train ImageSets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from dynammo.data.datasets import DATASETS, RawDataset
from dynammo.data.imageset import ImageSet, subsample_per_class
from dynammo.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IN_MEMORY_LIMIT_BYTES = 4 * 1024**3


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    """Per-channel mean/std in [0, 1] of a uint8 (N, C, H, W) tensor (up to 5000 images)."""
    x = images[: 5000].float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def _fits_memory(s: ImageSet, size: Optional[int]) -> bool:
    side = size or 256
    return len(s) * s.channels * side * side < IN_MEMORY_LIMIT_BYTES


def _prepare(raw: RawDataset, cfg, seed: int) -> RawDataset:
    """Subsample (before decoding), decode into memory when it fits, resize."""
    if len(raw.train) == 0:
        raise UserError(f"dataset {raw.name} has no training images; check data_root")
    if len(raw.test) == 0:
        raise UserError(f"dataset {raw.name} has no test images; lower test_fraction's rounding or add images")
    train = raw.train.subset(subsample_per_class(raw.train.labels, cfg.max_train_per_class, seed))
    test = raw.test.subset(subsample_per_class(raw.test.labels, cfg.max_test_per_class, seed + 1))
    mode = cfg.in_memory
    keep = mode == "true" or (mode == "auto" and _fits_memory(train, cfg.img_size) and _fits_memory(test, cfg.img_size))
    if keep:
        train, test = train.materialize(), test.materialize()
    if cfg.img_size is not None:
        train, test = train.resized(cfg.img_size), test.resized(cfg.img_size)
    elif not train.in_memory:
        raise UserError(f"dataset {raw.name} is read from files lazily; set img_size=N so every image has one size")
    return RawDataset(raw.name, raw.class_names, train, test, raw.flip)


def load_one(name: str, cfg, seed: int, root) -> RawDataset:
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
    if cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.normalize == "none":
        mean, std = (0.0,) * 3, (1.0,) * 3
    else:
        sample = train if train.in_memory else train.subset(torch.arange(min(len(train), 1000))).materialize()
        mean, std = channel_stats(sample.images)
    if len(mean) == 3 and train.channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    present = torch.unique(train.labels).numel()
    if present != len(class_names):
        raise UserError(
            f"only {present} of {len(class_names)} classes have training images after splitting; "
            "add images or lower test_fraction"
        )
    return LoadedData(names, class_names, train, test, mean, std, flip,
                      [len(p.class_names) for p in parts] if stream else None)
