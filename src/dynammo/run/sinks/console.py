"""What the terminal and log.txt show of a run: what it trains on, a line per task, the final table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from dynammo.console import Console
from dynammo.reporting.text import format_table
from dynammo.run.sinks import Sink, TaskRecord


class ConsoleSink(Sink):
    def __init__(self, cfg, console: Console, engine, data, scenario, run_dir: Path):
        self.cfg, self.console, self.engine, self.data, self.scenario = cfg, console, engine, data, scenario
        self.run_dir = run_dir

    def open(self) -> None:
        cfg, data, scenario, engine, say = self.cfg, self.data, self.scenario, self.engine, self.console.print
        say(f"{cfg.method} on {'+'.join(data.names)}: {data.num_classes} classes, {len(scenario)} tasks "
            f"{[t.size for t in scenario.tasks]}, {len(scenario.train)} train / {len(scenario.test)} test images, "
            f"backbone {cfg.backbone}, device {engine.device}, seed {cfg.seed}")
        say(f"compute: {engine.compute.describe()}")
        say(f"split: {data.split_text()}")
        say(data.describe_classes())

    def task_done(self, record: TaskRecord) -> None:
        metrics, results, cost = record.metrics, record.results, record.cost
        til_txt = f", task-IL {metrics.task_il_acc[-1]:.2f}" if metrics.task_il_acc else ""
        if "task_id_acc" in results:
            til_txt += f", task-id {results['task_id_acc'][-1]:.2f}"
        til_txt += f", ECE {metrics.ece[-1]:.2f}"
        if metrics.openset[-1] is not None:
            til_txt += f", open-set AUROC {metrics.openset[-1]['auroc']:.2f}"
        self.console.print(f"{record.label} done: accuracy on {record.task.end} seen classes {metrics.acc[-1]:.2f} "
                           f"(mcr {metrics.mcr[-1]:.2f}{til_txt}), {cost['inference_gflops']:.3f} GFLOPs/image, "
                           f"{record.exemplars} exemplars, {record.train_seconds:.1f}s")

    def run_done(self, results: dict, confusion: Optional[np.ndarray]) -> None:
        self.console.print(format_table(results))
        self.console.print(f"run directory: {self.run_dir}")
