"""Reading a run directory back: its config, its checkpoints (loaded safely, with
`torch.load(weights_only=True)`: no pickled code runs), and a method rebuilt from a checkpoint
without the training data (the checkpoint records the classes, the split and the normalisation)."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

import torch
import yaml

from dynammo.assembly import build_from_record
from dynammo.config import Config
from dynammo.config_yaml import read_yaml
from dynammo.configure import build_config
from dynammo.data.imageset import ImageSet
from dynammo.data.scenario import Scenario
from dynammo.errors import UserError
from dynammo.methods.base import check_eval_mode
from dynammo.sealing import check_seal

_CHECKPOINT = re.compile(r"task_(\d+)\.pt$")


def read_run_config(run_dir) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if (run_dir / "pretrain.json").is_file():  # written by `dynammo pretrain` (dynammo/pretrain/run.py)
        raise UserError(f"{run_dir} is a `dynammo pretrain` run, not a continual one: continue it with `dynammo "
                        f"pretrain --resume {run_dir}`, use its backbone with pretrained={run_dir / 'backbone.pt'}")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the --out folder of a `dynammo run`")
    return build_config(read_yaml(path))  # the bounded reader of every config file (size, aliases, encodings)


def available_checkpoints(run_dir) -> dict:
    """{task id (0-based): path} of the run's per-task checkpoints."""
    found = {}
    for p in (Path(run_dir) / "checkpoints").glob("task_*.pt"):
        m = _CHECKPOINT.search(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def checkpoint_path(run_dir, task: Optional[int] = None) -> Path:
    """The checkpoint after `task` (1-based, as printed by the run), or the last one."""
    found = available_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} holds no checkpoints (checkpoints/task_N.pt); the run had save_checkpoints=false "
                        "or stopped before its first task ended")
    if task is None:
        return found[max(found)]
    if task - 1 not in found:
        raise UserError(f"{run_dir} has no checkpoint after task {task}; available: "
                        f"{', '.join(str(t + 1) for t in found)}")
    return found[task - 1]


def load_checkpoint(path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint {path} does not exist") from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UserError(f"checkpoint {path} is damaged or not a dynammo checkpoint ({exc.__class__.__name__}); "
                        "use an earlier task's checkpoint") from exc
    if not isinstance(state, dict) or "method" not in state or not ("state" in state or "journal" in state):
        raise UserError(f"{path} is not a dynammo checkpoint (no method state in it)")
    check_seal(state, path)
    return state


def _plain(values) -> dict:
    return yaml.safe_load(yaml.safe_dump(dict(values), sort_keys=True)) or {}  # as config.yaml holds them


def check_resume_config(ckpt: dict, cfg, path, config_file) -> dict:
    """A resume continues the experiment the checkpoint was trained in: refuse a config that differs
    from the checkpoint's in any key that changes results (naming the keys). Returns the result-neutral
    keys that differ, {key: {"checkpoint": value, "now": value}}, for results.json. Keys only one side
    knows (added by a later version) and checkpoints without a config are not compared."""
    from dynammo.protocols import RESULT_NEUTRAL_KEYS

    if not isinstance(ckpt.get("config"), dict):
        return {}
    saved, now = _plain(ckpt["config"]), _plain(cfg)
    changed = {k: {"checkpoint": saved[k], "now": now[k]} for k in sorted(set(saved) & set(now)) if saved[k] != now[k]}
    mixed = [k for k in changed if k not in RESULT_NEUTRAL_KEYS]
    if mixed:
        shown = ", ".join(f"{k} ({changed[k]['checkpoint']!r} -> {changed[k]['now']!r})" for k in mixed)
        raise UserError(f"{config_file} differs from the config {path} was trained with in {shown}; a resume must "
                        "continue the same experiment: restore these values, or start a new run with them")
    return changed


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
