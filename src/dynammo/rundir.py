"""The run directory of `dynammo run`: one writer and one reader of its files.

  config.yaml            the resolved config
  results.json           everything measured so far, with its `status`: running | interrupted |
                         failed | complete (a results.json without `status` predates it and was
                         only ever written complete)
  metrics.csv            one row per finished task
  checkpoints/task_N.pt  after task N+1, sealed, with the run's header (method, dataset, class order)
  checkpoints/partial.pt the state inside the next task (every checkpoint_every epochs, on a signal)
  log.txt, tb/, plots/   the console's copy, TensorBoard scalars, figures

Every file is written atomically, so a crash or a full disk leaves the previous version intact.
Checkpoints are read with `torch.load(weights_only=True)` (no pickled code runs) and their seal checked.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import re
import zipfile
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from dynammo.config import Config
from dynammo.config_yaml import read_yaml
from dynammo.configure import build_config
from dynammo.errors import UserError
from dynammo.io import read_json, save_torch_atomic, write_json_atomic, write_text_atomic
from dynammo.sealing import check_seal, sealed

RESULTS, CONFIG, METRICS, LOG, CHECKPOINTS, PARTIAL = ("results.json", "config.yaml", "metrics.csv", "log.txt",
                                                        "checkpoints", "partial.pt")
CSV_FIELDS = ["task", "classes", "classifier", "acc", "acc_task_mean", "mcr", "task_il_acc", "avg_acc_so_far", "ece",
              "openset_auroc", "openset_fpr95", "params_total", "params_trainable", "inference_gflops",
              "memory_exemplars", "memory_bytes", "train_seconds"]
_TASK_CHECKPOINT = re.compile(r"task_(\d+)\.pt$")


def default_run_dir(cfg) -> Path:
    ds = "+".join(cfg.dataset) if isinstance(cfg.dataset, list) else cfg.dataset
    return Path("runs") / f"{cfg.method}_{ds}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a directory that already holds a run."""
    if (run_dir / RESULTS).exists() or (run_dir / CHECKPOINTS).exists():
        raise UserError(f"run directory {run_dir} already holds a run; choose another --out or remove it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a directory")


# ---------------------------------------------------------------- status: the one rule for "complete"


def recorded_status(results: dict) -> str:
    """The status results.json records; one without `status` predates it and was only written complete."""
    return results.get("status") or "complete"


def is_complete(results: dict) -> bool:
    """A finished run: skipped by a sweep, averaged by `dynammo report`, refused by `dynammo resume`."""
    return recorded_status(results) == "complete" and "acc_matrix" in results


def read_results(run_dir) -> Optional[dict]:
    """results.json, {} when it cannot be read, None when there is none."""
    try:
        results = json.loads((Path(run_dir) / RESULTS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def run_status(run_dir) -> str:
    """complete | resume | fresh: skip it, `dynammo resume` it, or `dynammo run` it."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    if results and is_complete(results):
        return "complete"
    if results is not None or (run_dir / CHECKPOINTS).is_dir():
        return "resume"  # `dynammo run` refuses a folder holding a run; resume also restarts one with no task done
    return "fresh"


# ---------------------------------------------------------------- checkpoints


def run_header(cfg, data, scenario) -> dict:
    """What every checkpoint of the run records, to refuse it to another run."""
    return {"method": cfg.method, "dataset": "+".join(data.names), "class_order": scenario.class_order}


def check_same_run(ckpt: dict, header: dict, path) -> None:
    """Refuse a checkpoint of another method, dataset or class order than the run's config."""
    for key, what in (("method", "method"), ("dataset", "dataset"), ("class_order", "class order")):
        if ckpt.get(key) != header[key]:
            raise UserError(f"checkpoint {path} is of {what} {ckpt.get(key)} but the run's config gives {header[key]}; "
                            "it belongs to another run")


def available_checkpoints(run_dir) -> dict:
    """{task id (0-based): path} of the run's per-task checkpoints."""
    found = {}
    for p in (Path(run_dir) / CHECKPOINTS).glob("task_*.pt"):
        m = _TASK_CHECKPOINT.search(p.name)
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


# ---------------------------------------------------------------- reading and writing


def read_run_config(run_dir) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if (run_dir / "pretrain.json").is_file():  # written by `dynammo pretrain` (dynammo/pretrain/run.py)
        raise UserError(f"{run_dir} is a `dynammo pretrain` run, not a continual one: continue it with `dynammo "
                        f"pretrain --resume {run_dir}`, use its backbone with pretrained={run_dir / 'backbone.pt'}")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the --out folder of a `dynammo run`")
    return build_config(read_yaml(path))  # the bounded reader of every config file (size, aliases, encodings)


def read_results_to_resume(run_dir: Path) -> Optional[dict]:
    """results.json of a run to resume (None when there is none); one UserError line when damaged,
    or when the run is complete."""
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    recorded = read_json(path, RESULTS, "delete it: resume writes it again from the checkpoints")
    if isinstance(recorded, dict) and is_complete(recorded):
        raise UserError(f"the run in {run_dir} is complete; nothing to resume (evaluate it with `dynammo eval {run_dir}`)")
    return recorded


class RunDir:
    """The writer of a run directory (rank 0 of a distributed run; the others get MutedRunDir)."""

    def __init__(self, path: Path, cfg=None, resume: bool = False):
        """resume: continue writing the run directory of an interrupted run (its config is kept)."""
        self.dir = Path(path)
        if not resume:
            check_run_dir(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CHECKPOINTS).mkdir(exist_ok=True)
        if not resume:
            write_text_atomic(self.dir / CONFIG, yaml.safe_dump(dict(cfg), sort_keys=False))

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.dir / RESULTS, results)

    def write_rows(self, rows: List[dict]) -> None:
        """metrics.csv with one row per finished task."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.dir / METRICS, buf.getvalue())

    def save_checkpoint(self, task_id: int, state: dict) -> None:
        save_torch_atomic(self.dir / CHECKPOINTS / f"task_{task_id}.pt", sealed(state))

    def save_partial(self, state: dict) -> None:
        """The state inside a task (every checkpoint_every epochs, and on SIGINT/SIGTERM)."""
        save_torch_atomic(self.dir / CHECKPOINTS / PARTIAL, sealed(state))

    def remove_partial(self) -> None:
        (self.dir / CHECKPOINTS / PARTIAL).unlink(missing_ok=True)

    def remove_stale_writes(self) -> None:
        """Temporary files of a write cut short by a kill."""
        for stale in (self.dir / CHECKPOINTS).glob(".*.tmp"):
            stale.unlink()

    def mark_stopped(self, status: str, reason: str) -> None:
        """results.json says why the run stopped; what the finished tasks recorded stays as it was."""
        path = self.dir / RESULTS
        if path.is_file():
            try:
                self.write_results({**json.loads(path.read_text()), "status": status, "stopped_because": reason})
            except UserError:
                pass  # the disk is full: the previous results.json is still intact


class MutedRunDir(RunDir):
    """The run directory as a distributed run's other ranks see it: rank 0 writes it."""

    def __init__(self, path: Path):
        self.dir = Path(path)

    def write_results(self, results: dict) -> None:
        pass

    def write_rows(self, rows: List[dict]) -> None:
        pass

    def save_checkpoint(self, task_id: int, state: dict) -> None:
        pass

    def save_partial(self, state: dict) -> None:
        pass

    def remove_partial(self) -> None:
        pass

    def remove_stale_writes(self) -> None:
        pass

    def mark_stopped(self, status: str, reason: str) -> None:
        pass
