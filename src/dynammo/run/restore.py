"""A trained method rebuilt from a checkpoint without the training data: the checkpoint's scenario
record holds the classes, the split and the input normalisation."""
from __future__ import annotations

import torch

from dynammo.assembly import build_from_record
from dynammo.config import Config
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Scenario
from dynammo.errors import UserError
from dynammo.methods.base import check_eval_mode


def scenario_record(data, scenario) -> dict:
    """What rebuilding the model needs without the data: classes, split and input normalisation."""
    return {"class_names": list(data.class_names), "class_order": list(scenario.class_order),
            "sizes": [t.size for t in scenario.tasks], "mean": list(data.mean), "std": list(data.std),
            "input_shape": list(scenario.test.get(torch.tensor([0])).shape[1:])}  # (C, H, W) of uint8 inputs


def skeleton_scenario(record: dict) -> Scenario:
    """The scenario of a checkpoint with no images: tasks, class order and names only."""
    c, h, w = record["input_shape"]
    empty = ImageSet(torch.zeros(0, dtype=torch.long), images=torch.zeros((0, c, h, w), dtype=torch.uint8))
    return Scenario(empty, empty, record["class_names"], record["class_order"], record["sizes"])


def restore_method(cfg: Config, ckpt: dict, device: str = "cpu"):
    """The trained method of a checkpoint, on `device`, ready for inference (no data needed)."""
    if "scenario" not in ckpt:
        raise UserError("this checkpoint was written by an older dynammo without the scenario record; re-run to export it")
    if ckpt["method"] != cfg.method:
        raise UserError(f"the checkpoint is of method '{ckpt['method']}' but the run's config.yaml says "
                        f"'{cfg.method}'; the run directory was mixed up")
    record = ckpt["scenario"]
    cfg = cfg.copy()
    cfg["pretrained"] = False  # the checkpoint holds every weight; the pretrained file need not exist here
    method = build_from_record(cfg, skeleton_scenario(record), record["mean"], record["std"], device).method
    method.load_state_dict(ckpt["state"])
    method.eval_mode()
    check_eval_mode(method)
    return method
