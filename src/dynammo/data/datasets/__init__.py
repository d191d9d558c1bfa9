"""Dataset sources: one file per source, each registers a loader `load(cfg, root, seed) -> RawDataset`.

Class ids always come from sorted class names, never from the order a directory listing returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from dynammo.data.imageset import ImageSet
from dynammo.registry import Registry, register_modules

DATASETS: Registry = Registry("dataset")
LAYOUTS: Dict[str, str] = {}  # dataset name -> the on-disk layout it reads, in one line (`dynammo list`)


@dataclass(frozen=True)
class DatasetShape:
    """What a benchmark's images are without reading them (for `dynammo cost`)."""

    classes: int
    channels: int
    size: Optional[int]  # side of its square images; None: of many sizes (img_size gives the size)


SHAPES: Dict[str, DatasetShape] = {}  # dataset name -> its shape, for the benchmarks of fixed shape


def dataset(name: str, layout: str, aliases: tuple = (), shape: Optional[DatasetShape] = None) -> Callable:
    """Register a loader `load(cfg, root, seed) -> RawDataset` with the layout it expects under data_root
    (and the shape of its images when it is fixed: a benchmark, not the user's own folder)."""
    LAYOUTS[name] = layout
    if shape is not None:
        SHAPES[name] = shape
    return DATASETS.register(name, aliases=aliases)


@dataclass
class RawDataset:
    name: str
    class_names: List[str]
    train: ImageSet
    test: ImageSet
    flip: bool = True  # is a horizontal flip a label-preserving augmentation here?
    split: str = "official"  # how train and test were made (recorded in results.json and the log)


# every module of this package is a dataset source (a new file registers itself), but what several share
register_modules(__name__, __path__, helpers=("files", "medical"))
