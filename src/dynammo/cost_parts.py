"""What `dynammo cost` counts on: a method grown on the registered shape of a benchmark (number of
classes, channels, image size: no image is read, so no dataset needs to be present), or, for the
user's own folder or CSV, whose shape only its images tell, the run's own parts built from the data."""
from __future__ import annotations

from typing import List, Optional

import torch

from dynammo.assembly import RunParts, build_from_record, build_run
from dynammo.data.datasets import DATASETS, SHAPES, DatasetShape
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Scenario, task_sizes
from dynammo.errors import UserError
from dynammo.methods import METHODS


def dataset_names(cfg) -> List[str]:
    return list(cfg.dataset) if isinstance(cfg.dataset, list) else [cfg.dataset]


def registered_shapes(cfg) -> Optional[List[DatasetShape]]:
    """The shape of every dataset of the config, or None when one of them has no registered shape."""
    shapes = [SHAPES.get(DATASETS.canonical(n)) for n in dataset_names(cfg)]
    return None if any(s is None for s in shapes) else shapes


def shape_only_parts(cfg, shapes: List[DatasetShape], console) -> RunParts:
    """The method, engine and a scenario of one blank image, as the data would make them."""
    names = dataset_names(cfg)
    sides = {s.size for s in shapes}
    side = cfg.img_size or (sides.pop() if len(sides) == 1 else None)
    if side is None:
        raise UserError(f"dynammo cost needs img_size for {'+'.join(names)}: its images have no one size; "
                        "add img_size=N")
    classes = sum(s.classes for s in shapes)
    sizes = [s.classes for s in shapes] if len(shapes) > 1 else task_sizes(classes, cfg.init_cls, cfg.increment)
    METHODS.get(cfg.method).check_config(cfg, classes)
    channels = max(s.channels for s in shapes)
    blank = ImageSet(torch.zeros(1, dtype=torch.long), images=torch.zeros((1, channels, side, side), dtype=torch.uint8))
    scenario = Scenario(blank, blank, [f"class {i}" for i in range(classes)], list(range(classes)), sizes)
    built = cfg.copy()
    built["pretrained"] = False  # the weights change no count; a pretrained file or download need not exist
    return build_from_record(built, scenario, (0.5,) * channels, (0.5,) * channels, cfg.device)


def cost_parts(cfg, console) -> RunParts:
    shapes = registered_shapes(cfg)
    if shapes is not None:
        return shape_only_parts(cfg, shapes, console)
    try:
        return build_run(cfg, console)
    except UserError as exc:
        unknown = [n for n in dataset_names(cfg) if DATASETS.canonical(n) not in SHAPES]
        raise UserError(f"dynammo cost needs the images of dataset {', '.join(unknown)} (its classes and image size "
                        f"are only known from them): {exc}") from None
