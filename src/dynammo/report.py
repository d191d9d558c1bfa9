"""Run outputs: results.json, metrics.csv, TensorBoard scalars, checkpoints and plots.

Every file is written atomically, so a crash or a full disk leaves the previous version intact.
"""
from __future__ import annotations

import csv
import io
import platform
from pathlib import Path
from typing import List, Optional

import numpy as np
import yaml

from dynammo import __version__
from dynammo.errors import UserError
from dynammo.io import save_torch_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic
from dynammo.sealing import sealed

CSV_FIELDS = ["task", "classes", "classifier", "acc", "acc_task_mean", "mcr", "task_il_acc", "avg_acc_so_far", "ece",
              "openset_auroc",
              "openset_fpr95", "params_total",
              "params_trainable", "inference_gflops", "memory_exemplars", "memory_bytes", "train_seconds"]


def versions() -> dict:
    import torch
    import torchvision

    return {"dynammo": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "python": platform.python_version()}


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a directory that already holds a run."""
    if (run_dir / "results.json").exists() or (run_dir / "checkpoints").exists():
        raise UserError(f"run directory {run_dir} already holds a run; choose another --out or remove it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a directory")


class RunWriter:
    def __init__(self, run_dir: Path, cfg, tensorboard: bool = True, resume: bool = False):
        """resume: continue writing the run directory of an interrupted run (its config is kept)."""
        self.dir = Path(run_dir)
        if not resume:
            check_run_dir(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)
        if not resume:
            write_text_atomic(self.dir / "config.yaml", yaml.safe_dump(dict(cfg), sort_keys=False))
        self.rows: List[dict] = []
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; tolerate its absence
                self.tb = None

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.dir / "results.json", results)

    def write_rows(self, rows: List[dict]) -> None:
        """metrics.csv with one row per finished task; TensorBoard gets the newest row."""
        new = rows[len(self.rows):]
        self.rows = list(rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.dir / "metrics.csv", buf.getvalue())
        if self.tb is not None:
            for row in new:
                for key in ("acc", "mcr", "task_il_acc", "inference_gflops", "memory_exemplars"):
                    if row.get(key) is not None:
                        self.tb.add_scalar(f"eval/{key}", row[key], row["task"])
            self.tb.flush()

    def save_checkpoint(self, task_id: int, state: dict) -> Path:
        path = self.dir / "checkpoints" / f"task_{task_id}.pt"
        save_torch_atomic(path, sealed(state))
        return path

    def save_partial(self, state: dict) -> None:
        """The state inside a task (every checkpoint_every epochs, and on SIGINT/SIGTERM)."""
        save_torch_atomic(self.dir / "checkpoints" / "partial.pt", sealed(state))

    def remove_partial(self) -> None:
        (self.dir / "checkpoints" / "partial.pt").unlink(missing_ok=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class MutedWriter(RunWriter):
    """The writer of a distributed run's other ranks: rank 0 writes the run directory."""

    def __init__(self, run_dir: Path):
        self.dir, self.rows, self.tb = Path(run_dir), [], None

    def write_results(self, results: dict) -> None:
        pass

    def write_rows(self, rows: List[dict]) -> None:
        self.rows = list(rows)

    def save_checkpoint(self, task_id: int, state: dict) -> Path:
        return self.dir / "checkpoints" / f"task_{task_id}.pt"

    def save_partial(self, state: dict) -> None:
        pass

    def remove_partial(self) -> None:
        pass


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def make_plots(results: dict, confusion: Optional[np.ndarray], out_dir: Path, class_names: List[str]) -> None:
    """accuracy.png (accuracy after each task), acc_matrix.png (heatmap), confusion.png (last task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{results['method']} on {results['dataset']} (seed {results['seed']})"
    acc = results["acc"]
    tasks = np.arange(1, len(acc) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(tasks, acc, "o-", label=f"accuracy (avg {results['avg_acc']:.1f})")
    if results.get("mcr"):
        ax.plot(tasks, results["mcr"], "s--", label="mean class recall")
    if results.get("task_il_acc"):
        ax.plot(tasks, results["task_il_acc"], "^:", label="task-IL accuracy")
    ax.set_xlabel("after task")
    ax.set_ylabel("% on all seen classes")
    ax.set_xticks(tasks)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    _save_fig(fig, out_dir / "accuracy.png")
    plt.close(fig)

    a = np.array([[np.nan if v is None else v for v in row] for row in results["acc_matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(a), 1.0 + 0.6 * len(a)))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
    for (j, i), v in np.ndenumerate(a):
        if not np.isnan(v):
            ax.text(i, j, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(len(a)), [str(i + 1) for i in range(len(a))])
    ax.set_yticks(range(len(a)), [str(i + 1) for i in range(len(a))])
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("accuracy matrix (%)", fontsize=10)
    _save_fig(fig, out_dir / "acc_matrix.png")
    plt.close(fig)

    if confusion is not None:
        n = len(confusion)
        rows = confusion.sum(1, keepdims=True)
        norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=float), where=rows > 0)
        fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        if n <= 20:
            for (t, p), v in np.ndenumerate(confusion):
                ax.text(p, t, str(v), ha="center", va="center", fontsize=7, color="white" if norm[t, p] > 0.5 else "black")
            names = [c if len(c) <= 14 else c[:13] + "…" for c in class_names[:n]]
            ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(n), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion after the last task", fontsize=10)
        _save_fig(fig, out_dir / "confusion.png")
        plt.close(fig)


def format_table(results: dict) -> str:
    """Accuracy after each task, as the console and log.txt show it."""
    a = results["acc_matrix"]
    T = len(a)
    head = "after task | " + " ".join(f"T{i + 1:>5}" for i in range(T)) + " |   acc    mcr  tIL-acc"
    lines = [head, "-" * len(head)]
    til = results.get("task_il_acc") or []
    for j, row in enumerate(a):
        cells = " ".join(f"{v:6.1f}" if v is not None else "     -" for v in row)
        t = f"{til[j]:7.1f}" if j < len(til) else "      -"
        lines.append(f"{j + 1:>10} | {cells} | {results['acc'][j]:5.1f} {results['mcr'][j]:6.1f} {t}")
    f = results.get("forgetting")
    lines.append(f"avg acc {results['avg_acc']:.2f}  last acc {results['last_acc']:.2f}  "
                 f"avg mcr {results['avg_mcr']:.2f}  last mcr {results['last_mcr']:.2f}"
                 + (f"  forgetting {f:.2f}  bwt {results['bwt']:.2f}" if f is not None else ""))
    line = task_mean_line(results)
    if line:
        lines.append(line)
    if results.get("avg_ece") is not None and results.get("last_ece") is not None:
        openset = results.get("openset") or {}
        auroc, fpr95 = openset.get("avg_auroc"), openset.get("avg_fpr95")
        of = f" of the {results['classifier']} classifier" if results.get("classifier") not in (None, "head") else ""
        lines.append(f"avg ece {results['avg_ece']:.2f}  last ece {results['last_ece']:.2f}"
                     + (f"  open-set avg auroc {auroc:.2f}  avg fpr95 {fpr95:.2f} ({openset['score']})"
                        if auroc is not None and fpr95 is not None else "") + of)
    for name, extra in (results.get("extra") or {}).items():
        lines.append(f"  {name} classifier: avg acc {extra['avg_acc']:.2f}  last acc {extra['last_acc']:.2f}")
    lines += run_identity_lines(results)
    return "\n".join(lines)


def task_mean_line(results: dict) -> Optional[str]:
    """The mean over tasks of per-task accuracy, where it differs from the pooled acc or is the headline."""
    avg, last = results.get("avg_acc_task_mean"), results.get("last_acc_task_mean")
    if avg is None or last is None:
        return None
    if results.get("metric") != "acc_task_mean" and (round(avg, 2), round(last, 2)) == (
            round(results.get("avg_acc") or 0.0, 2), round(results.get("last_acc") or 0.0, 2)):
        return None
    return (f"avg acc_task_mean {avg:.2f}  last acc_task_mean {last:.2f}  (mean over tasks of each task's accuracy, "
            "as L2P, DualPrompt and CODA-Prompt report; acc pools the images)")


def run_identity_lines(results: dict) -> List[str]:
    """What a table must say beside the numbers: the protocol (and where the run departs from it),
    the method's label and every deviation from its paper."""
    p = results.get("protocol") or {}
    departs = p.get("departs") or {}
    line = f"protocol {p.get('name') or '(none named)'} #{p.get('hash', '?')}, headline {results.get('metric', 'acc')}"
    if departs:
        line += "; departs from it in " + ", ".join(f"{k}={v['run']!r} (protocol: {v['protocol']!r})"
                                                      for k, v in departs.items())
    out = [f"{results.get('label', results['method'])}: {line}"]
    out += [f"deviation: {d}" for d in results.get("deviations") or []]
    if results.get("untuned"):
        out.append(f"untuned: {results.get('untuned_reason')}")
    out += [f"diverged: {diverged_stage_text(d)}" for d in results.get("diverged_stages") or []]
    return out


def diverged_stage_text(d: dict) -> str:
    """'task 2 classifier: loss 2.600 -> 10.600' for an entry of results.json `diverged_stages`."""
    return f"task {d['task']} {d['stage']}: loss {d['first_loss']:.3f} -> {d['last_loss']:.3f}"
