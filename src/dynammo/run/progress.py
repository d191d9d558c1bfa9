"""What a run has produced so far, as a checkpoint carries it: metrics, results.json content,
metrics.csv rows and the next task."""
from __future__ import annotations

import platform

import numpy as np

from dynammo import __version__
from dynammo.compute import compute_record
from dynammo.methods import METHODS
from dynammo.metrics import ContinualMetrics
from dynammo.protocols import protocol_record, untuned_reason
from dynammo.run.evaluation import label_scores


def versions() -> dict:
    """The versions a run was made with (results.json, pretrain.json)."""
    import torch
    import torchvision

    return {"dynammo": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "python": platform.python_version()}


class Progress:
    def __init__(self, metrics: ContinualMetrics, results: dict, rows: list, next_task: int):
        self.metrics, self.results, self.rows, self.next_task = metrics, results, rows, next_task

    @classmethod
    def fresh(cls, cfg, data, scenario) -> "Progress":
        method_cls = METHODS.get(cfg.method)
        counts = data.class_counts()
        results = {
            "method": cfg.method, "label": method_cls.label(cfg), "protocol": protocol_record(cfg),
            "metric": cfg.metric, "deviations": method_cls.deviations(cfg), "budget": [],
            "untuned": untuned_reason(cfg) is not None, "untuned_reason": untuned_reason(cfg),
            "dataset": "+".join(data.names), "data_split": data.split_text(),
            "class_counts": {"train": [c[1] for c in counts], "test": [c[2] for c in counts]},
            "backbone": cfg.backbone, "seed": cfg.seed,
            "compute": compute_record(cfg),  # autocast dtype and image layout (compute.py)
            "class_order": scenario.class_order, "tasks": scenario.classes_of_tasks(),
            "class_names": scenario.class_names, "cost": [], "versions": versions(), "status": "running",
        }
        metrics = label_scores(ContinualMetrics([(t.start, t.end) for t in scenario.tasks]), cfg)
        return cls(metrics, results, [], 0)

    @classmethod
    def restore(cls, ckpt: dict) -> "Progress":
        metrics = ContinualMetrics([tuple(b) for b in ckpt["progress"]["bounds"]])
        metrics.load_state_dict(ckpt["progress"]["metrics"])
        return cls(metrics, ckpt["progress"]["results"], ckpt["progress"]["rows"], ckpt["task"] + 1)

    def state_dict(self) -> dict:
        return {"bounds": [list(b) for b in self.metrics.bounds], "metrics": self.metrics.state_dict(),
                "results": self.results, "rows": self.rows}
