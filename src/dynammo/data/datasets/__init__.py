"""Dataset sources: one file per source, each registers a loader `load(cfg, root, seed) -> RawDataset`.

Class ids always come from sorted class names, never from the order a directory listing returns.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List

from dynammo.data.imageset import ImageSet
from dynammo.registry import Registry

DATASETS: Registry = Registry("dataset")
LAYOUTS: Dict[str, str] = {}  # dataset name -> the on-disk layout it reads, in one line (`dynammo list`)


def dataset(name: str, layout: str, aliases: tuple = ()) -> Callable:
    """Register a loader `load(cfg, root, seed) -> RawDataset` with the layout it expects under data_root."""
    LAYOUTS[name] = layout
    return DATASETS.register(name, aliases=aliases)


@dataclass
class RawDataset:
    name: str
    class_names: List[str]
    train: ImageSet
    test: ImageSet
    flip: bool = True  # is a horizontal flip a label-preserving augmentation here?
    split: str = "official"  # how train and test were made (recorded in results.json and the log)


for _module in ("digits", "mednist", "medmnist", "cifar", "folder", "csv_list", "path16", "skin7", "skin8", "skin40",
                "imagenet", "imagenet_r", "tinyimagenet", "cub200"):
    importlib.import_module(f"dynammo.data.datasets.{_module}")
