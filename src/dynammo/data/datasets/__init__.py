"""Dataset sources: one file per source, each registers a loader `load(cfg, root, seed) -> RawDataset`.

Class ids always come from sorted class names, never from the order a directory listing returns.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import List

from dynammo.data.imageset import ImageSet
from dynammo.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass
class RawDataset:
    name: str
    class_names: List[str]
    train: ImageSet
    test: ImageSet
    flip: bool = True  # is a horizontal flip a label-preserving augmentation here?


for _module in ("digits", "mednist", "medmnist", "cifar", "folder", "csv_list"):
    importlib.import_module(f"dynammo.data.datasets.{_module}")
