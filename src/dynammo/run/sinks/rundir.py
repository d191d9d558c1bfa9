"""The run directory's sink: each task's checkpoint, results.json and metrics.csv; at the end the
final results.json and the run's figures (plots/)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from dynammo.io import write_bytes_atomic
from dynammo.journal import rng_state
from dynammo.run.restore import scenario_record
from dynammo.run.sinks import Sink, TaskRecord
from dynammo.rundir import RunDir


class RunDirSink(Sink):
    def __init__(self, cfg, run_dir: RunDir, method, engine, progress, header: dict, data, scenario):
        self.cfg, self.run_dir, self.method, self.engine, self.progress = cfg, run_dir, method, engine, progress
        self.header, self.data, self.scenario = header, data, scenario

    def task_done(self, record: TaskRecord) -> None:
        if self.cfg.save_checkpoints:  # before results.json: a results.json row always has its checkpoint
            self.run_dir.save_checkpoint(record.task.id, self.checkpoint(record.task.id))
            self.run_dir.remove_partial()
        self.run_dir.write_results(record.results)
        self.run_dir.write_rows(self.progress.rows)

    def checkpoint(self, task_id: int) -> dict:
        engine = self.engine
        return {"kind": "task", **self.header, "task": task_id, "scenario": scenario_record(self.data, self.scenario),
                "state": self.method.state_dict(), "optimizer": engine.last_optimizer_state,
                "rng": rng_state(engine.generator), "progress": self.progress.state_dict(), "config": dict(self.cfg)}

    def partial(self, journal_state: dict) -> None:
        """The journal's partial checkpoint inside the next task."""
        self.run_dir.save_partial({"kind": "partial", **self.header, "task": self.progress.next_task,
                                   "journal": journal_state, "config": dict(self.cfg)})

    def run_done(self, results: dict, confusion: Optional[np.ndarray]) -> None:
        self.run_dir.write_results(results)
        if self.cfg.plots and self.engine.world.main:
            write_plots(self.run_dir.dir, results)


def write_plots(run_dir, results: dict) -> List[str]:
    """<run>/plots/accuracy.png, acc_matrix.png, confusion.png: `dynammo report`'s figures of this one run."""
    from dynammo.reporting.discover import Run
    from dynammo.reporting.figures import run_figures

    names = []
    for fig in run_figures(Run(run_dir, results)):
        write_bytes_atomic(run_dir / "plots" / f"{fig.name}.png", fig.png)
        names.append(fig.name)
    return names
