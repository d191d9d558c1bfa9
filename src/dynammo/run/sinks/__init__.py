"""Where a run's records go: the run directory, TensorBoard, MLflow, the console, the distributed
ranks' agreement check. The task loop calls every sink of its list in order; a new destination is
one new Sink subclass in this package, added to the list `single.make_sinks` builds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from dynammo.metrics import OPENSET_KEYS, SUMMARY_KEYS, ContinualMetrics

# per-task lists of results.json logged as metrics of that task (step = task number)
TASK_KEYS = ("acc", "mcr", "task_il_acc", "task_id_acc", "ece")
COST_KEYS = ("inference_gflops", "params_total", "params_trainable", "memory_exemplars", "memory_bytes",
             "train_seconds", "train_images")


@dataclass
class TaskRecord:
    """What one finished task produced."""

    task: object  # the scenario's Task (id 0-based, end = classes seen)
    label: str  # "task 2/5", as the engine names it
    results: dict  # results.json content so far: a sink may add to it before the run directory's sink writes it
    row: dict  # its metrics.csv row
    cost: dict
    metrics: ContinualMetrics
    train_seconds: float
    exemplars: int


class Sink:
    """A destination of a run's records; each hook does nothing unless overridden."""

    def start(self, results: dict) -> None:
        """Before the run directory is written: a store that cannot be reached stops the run here."""

    def open(self) -> None:
        """The run starts (its log.txt is open)."""

    def task_done(self, record: TaskRecord) -> None:
        pass

    def run_done(self, results: dict, confusion: Optional[np.ndarray]) -> None:
        """Every task is done; results.json's final content."""

    def close(self, results: dict, status: str) -> None:
        """However the run ended (complete, interrupted or failed)."""


def _number(v) -> Optional[float]:
    return None if v is None or isinstance(v, bool) else float(v)


def task_metrics(results: dict, j: int) -> Dict[str, float]:
    """The metrics of task j (0-based) as results.json holds them: accuracies, calibration, open-set
    (openset_<name>) and cost; missing and null values left out."""
    out: Dict[str, float] = {}
    for key in TASK_KEYS:
        values = results.get(key) or []
        if j < len(values) and _number(values[j]) is not None:
            out[key] = _number(values[j])
    openset = results.get("openset") or {}
    for key in OPENSET_KEYS:
        values = openset.get(key) or []
        if j < len(values) and _number(values[j]) is not None:
            out[f"openset_{key}"] = _number(values[j])
    cost = results.get("cost") or []
    if j < len(cost):
        for key in COST_KEYS:
            if _number(cost[j].get(key)) is not None:
                out[key] = _number(cost[j][key])
    return out


def final_metrics(results: dict) -> Dict[str, float]:
    """The run's single numbers (logged once at the end)."""
    out = {key: _number(results.get(key)) for key in SUMMARY_KEYS if _number(results.get(key)) is not None}
    openset = results.get("openset") or {}
    for key in OPENSET_KEYS:
        if _number(openset.get(f"avg_{key}")) is not None:
            out[f"openset_avg_{key}"] = _number(openset[f"avg_{key}"])
    return out
