"""Finding runs: every folder holding a results.json under the given paths (single runs and the
seed<N>/ folders of a seed list), read and sorted into usable, not-averaged and unreadable ones."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from dynammo.rundir import is_complete, recorded_status

# folders of a run directory that never hold a run: not walked
_SKIP_DIRS = {"checkpoints", "tb", "plots", "figures", "__pycache__"}


@dataclass
class Run:
    """One run directory and its results.json."""

    dir: Path
    results: dict
    config_text: Optional[str] = None

    @property
    def status(self) -> str:
        return recorded_status(self.results)

    @property
    def usable(self) -> bool:
        return is_complete(self.results)

    @property
    def method(self) -> str:
        return self.results["method"]

    @property
    def label(self) -> str:
        return self.results.get("label") or self.results["method"]

    @property
    def seed(self):
        return self.results.get("seed")

    @property
    def tasks_done(self) -> int:
        return len(self.results.get("acc_matrix") or [])

    @property
    def tasks_total(self) -> Optional[int]:
        tasks = self.results.get("tasks")
        return len(tasks) if isinstance(tasks, list) else None

    @property
    def protocol_key(self) -> Tuple[Optional[str], str]:
        """(name, hash): runs are only ever averaged within one key. A results.json without a protocol
        record is keyed by its dataset and backbone, and its section says that nothing is known to match."""
        p = self.results.get("protocol") or {}
        if p.get("hash"):
            return p.get("name"), str(p["hash"])
        return None, f"unrecorded:{self.results.get('dataset', '?')}/{self.results.get('backbone', '?')}"

    def state_text(self) -> str:
        """How far a run that is not averaged got: 'running, 2/3 tasks done'."""
        total = self.tasks_total
        done = f"{self.tasks_done}/{total}" if total else str(self.tasks_done)
        text = f"{self.status}, {done} tasks done"
        if self.results.get("stopped_because"):
            text += f" (stopped because: {' '.join(str(self.results['stopped_because']).split())})"
        return text


@dataclass
class Discovery:
    runs: List[Run] = field(default_factory=list)  # complete runs: averaged
    unfinished: List[Run] = field(default_factory=list)  # running / interrupted / failed: listed only
    problems: List[str] = field(default_factory=list)  # one line each, for stderr
    skipped: List[str] = field(default_factory=list)  # the problems that are not unfinished runs


def _walk(root: Path) -> Iterable[Path]:
    """Every folder at or below root holding a results.json, in sorted order."""
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        if "results.json" in files:
            yield Path(here)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number_or_null(v) -> bool:
    """A metric in percent (or a difference of two): far past +-100 is not one dynammo wrote, and a
    mean of such values could overflow to infinity, which no report file may hold."""
    return v is None or (_number(v) and abs(v) <= 1e4)


def _count_or_null(v) -> bool:
    return v is None or (_number(v) and 0 <= v <= 1e18)


def _list_of(item, nullable: bool = True):
    return lambda v: (nullable and v is None) or (isinstance(v, list) and all(item(x) for x in v))


def _dict_of(fields: dict):
    """A mapping (or null) whose listed keys, where present, pass their checks."""
    return lambda v: v is None or (isinstance(v, dict) and all(k not in v or ok(v[k]) for k, ok in fields.items()))


def _text(v) -> bool:
    return isinstance(v, str)


def _permutation(v) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
                         and sorted(v) == list(range(len(v))))


_NUMBERS = _list_of(_number_or_null)
_METRICS = {"acc_matrix": _list_of(_NUMBERS), "acc": _NUMBERS, "mcr": _NUMBERS, "task_il_acc": _NUMBERS,
            **{k: _number_or_null for k in ("avg_acc", "last_acc", "avg_mcr", "last_mcr", "forgetting", "bwt",
                                            "avg_ece", "last_ece")}, "ece": _NUMBERS}
_COST = _dict_of({k: _count_or_null for k in ("params_total", "params_trainable", "inference_gflops",
                                               "memory_exemplars", "memory_bytes", "train_seconds",
                                               "train_images")})
_STAGE = _dict_of({"stage": _text, "epochs": _count_or_null})
_DIVERGED = _dict_of({"task": _number, "stage": _text, "first_loss": _number, "last_loss": _number})
# every field of results.json that `dynammo report` reads, and what it must hold (absent is fine)
_FIELDS = {
    "method": _text, "label": lambda v: v is None or _text(v), "status": lambda v: v is None or _text(v),
    "metric": lambda v: v is None or _text(v), **_METRICS,
    "cost": _list_of(lambda c: isinstance(c, dict) and _COST(c)),
    "budget": _list_of(_list_of(lambda b: isinstance(b, dict) and {"stage", "epochs"} <= set(b) and _STAGE(b),
                                nullable=False)),
    "deviations": _list_of(_text), "extra": lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(m, dict) and _dict_of(_METRICS)(m) for m in v.values())),
    "protocol": _dict_of({"name": lambda v: v is None or _text(v), "hash": lambda v: v is None or _text(v),
                          "values": lambda v: v is None or isinstance(v, dict),
                          "departs": lambda v: v is None or isinstance(v, dict)}),
    "versions": lambda v: v is None or isinstance(v, dict),
    "tasks": lambda v: v is None or isinstance(v, list),
    "confusion": _list_of(_list_of(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
                                   nullable=False)),
    "class_order": _permutation, "class_names": _list_of(_text),
    "diverged_stages": _list_of(lambda d: isinstance(d, dict) and {"task", "stage", "first_loss", "last_loss"}
                                <= set(d) and _DIVERGED(d)),
    "untuned_reason": lambda v: v is None or _text(v),
}


def field_problem(results: dict) -> Optional[str]:
    """What is wrong with the first field of a results.json that the report cannot use, or None."""
    for key, ok in _FIELDS.items():
        if key in results and not ok(results[key]):
            return f"field '{key}' does not hold what dynammo writes there"
    matrix = results.get("acc_matrix") or []
    if any(len(row) < len(matrix) for row in matrix):
        return "field 'acc_matrix' has a row shorter than the number of tasks done"
    return None


def _no_constant(name):
    raise ValueError(f"{name} is not JSON (dynammo writes null for an undefined number)")


def read_run(run_dir: Path) -> Tuple[Optional[Run], Optional[str]]:
    """(run, None), or (None, why it cannot be used) for a half-written or foreign results.json."""
    path = run_dir / "results.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"skipped {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})"
    try:
        results = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return None, f"skipped {path}: not valid JSON (half-written?) at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return None, f"skipped {path}: {exc}"
    except RecursionError:
        return None, f"skipped {path}: not a dynammo results.json (nested too deeply to read)"
    missing = [k for k in ("method", "acc_matrix") if not isinstance(results, dict) or k not in results]
    if missing:
        return None, f"skipped {path}: not a dynammo results.json (no {' or '.join(missing)})"
    problem = field_problem(results)
    if problem:
        return None, f"skipped {path}: {problem}: damaged or not written by dynammo"
    run = Run(run_dir, results)
    if run.usable and (not run.results["acc_matrix"] or len(run.results.get("acc") or []) != run.tasks_done
                       or len(run.results.get("cost") or []) != run.tasks_done):
        return None, f"skipped {path}: status complete but acc_matrix, acc and cost disagree on the number of tasks"
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            run.config_text = cfg.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            run.config_text = None
    return run, None


def discover(paths: Iterable) -> Discovery:
    """Read every run under `paths` (folders, or results.json files). A folder given twice, or inside
    another one given, counts once."""
    found = Discovery()
    seen = set()
    for given in paths:
        root = Path(given)
        if root.is_file() and root.name == "results.json":
            root = root.parent
        problem = None
        if not root.exists():
            problem = f"skipped {given}: no such file or directory"
        elif not root.is_dir():
            problem = f"skipped {given}: not a directory (give run directories or folders of them)"
        dirs = [] if problem else list(_walk(root))
        if not problem and not dirs:
            problem = f"skipped {given}: holds no run (no results.json in it or below it)"
        if problem:
            found.problems.append(problem)
            found.skipped.append(problem)
            continue
        for run_dir in dirs:
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            run, problem = read_run(run_dir)
            if problem:
                found.problems.append(problem)
                found.skipped.append(problem)
            elif run.usable:
                found.runs.append(run)
            else:
                found.unfinished.append(run)
                found.problems.append(f"not averaged {run_dir}: {run.label} seed {run.seed} is {run.state_text()}")
    return found
