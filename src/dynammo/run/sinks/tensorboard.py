"""TensorBoard (tracking=tensorboard, as long as `tensorboard` is true): tb/ in the run directory.
Each task: eval/acc, mcr, task_il_acc, inference_gflops, memory_exemplars, then eval/ece and
eval/openset_<name>, step = the task number (1-based); the engine adds the training losses, and
`dynammo pretrain` its epochs, to the same SummaryWriter."""
from __future__ import annotations

from pathlib import Path

from dynammo.run.sinks import Sink, TaskRecord, task_metrics

ROW_KEYS = ("acc", "mcr", "task_il_acc", "inference_gflops", "memory_exemplars")


def tensorboard_on(cfg) -> bool:
    return cfg.get("tracking", "tensorboard") == "tensorboard" and bool(cfg.get("tensorboard", True))


def open_summary_writer(run_dir: Path):
    """The run's SummaryWriter on run_dir/tb, or None without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; tolerate its absence
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"))


class TensorBoardSink(Sink):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.tb = None

    def start(self, results: dict) -> None:
        self.tb = open_summary_writer(self.run_dir)

    def task_done(self, record: TaskRecord) -> None:
        if self.tb is None:
            return
        step = record.row["task"]
        for key in ROW_KEYS:
            if record.row.get(key) is not None:
                self.tb.add_scalar(f"eval/{key}", record.row[key], step)
        self.tb.flush()
        for key, value in task_metrics(record.results, record.task.id).items():
            if key == "ece" or key.startswith("openset_"):
                self.tb.add_scalar(f"eval/{key}", value, record.task.id + 1)
        self.tb.flush()

    def close(self, results: dict, status: str) -> None:
        if self.tb is not None:
            self.tb.close()
