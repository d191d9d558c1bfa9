"""What every step of the GPU check shares: its settings, the step loop with its budget, the record
written after every step, and small helpers."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from gpu_check_steps.render import markdown

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
SCRIPT = BENCHMARKS / "gpu_check.py"  # the entry; its methods step starts it again as a worker
STEP_NAMES = ("methods", "export", "speed", "loader", "latency")


@dataclass
class Settings:
    """Everything a step needs to know; the dry run and the GPU run differ only in these values."""
    out: str
    dry_run: bool = False
    device: str = "cuda"
    budget_s: float = 540.0
    methods: Optional[List[str]] = None  # None: every registered method
    steps: List[str] = field(default_factory=lambda: list(STEP_NAMES))
    fail: Optional[str] = None  # a step made to fail on purpose (to check that the next ones still run)
    data_root: Optional[str] = None
    # methods: the tiny protocol
    epochs: int = 2
    train_per_class: Optional[int] = None  # None: every digits training image (~145 per class)
    test_per_class: Optional[int] = None
    tiny_resnet: bool = False  # dry run: resnet20 at 8 px instead of the protocol's resnet18_cifar at 16 px
    # accuracy points: mean |auto - fp32| over the accuracy matrix's entries (docs/gpu.md says why the
    # mean and not the largest entry: two-epoch tasks make single entries swing by 25+ points)
    tolerance: float = 10.0
    # export: share of images whose class must agree; confidence difference allowed per compute path
    export_agreement: float = 0.99
    export_conf_auto: float = 0.05
    export_conf_fp32: float = 0.005
    # speed: backbone@size:batch:epochs per timed pass
    speed_models: List[str] = field(default_factory=lambda: [
        "resnet32@32:128:10", "resnet18@64:128:6", "resnet18@224:64:2", "vit_base_patch16_224@224:64:1"])
    speed_rounds: int = 3
    vit_min_free_gib: float = 20.0
    # loader
    loader_img_size: int = 224
    loader_images: int = 1536
    loader_workers: int = 8
    loader_batch: int = 64
    # latency
    latency_img_size: int = 224
    latency_tasks: List[int] = field(default_factory=lambda: [1, 5, 10])
    latency_calls: int = 30
    latency_batch: int = 32

    @classmethod
    def dry(cls, out: str, **kw) -> "Settings":
        base = dict(out=out, dry_run=True, device="cpu", budget_s=300.0, epochs=1, train_per_class=8,
                    test_per_class=6, tiny_resnet=True, speed_models=["resnet20@8:16:1"], speed_rounds=1,
                    loader_img_size=32, loader_images=48, loader_workers=0, loader_batch=16, latency_img_size=96,
                    latency_calls=2, latency_batch=4)
        return cls(**{**base, **kw})


def now() -> float:
    return time.monotonic()


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row_status(rows: List[dict]) -> tuple:
    """(status, reason) of a step from its rows: failed if any failed, skipped if all skipped."""
    failed = [r for r in rows if r.get("status") == "failed"]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if failed:
        names = ", ".join(f"{r.get('name')} ({r.get('reason')})" for r in failed)
        return "failed", f"{len(failed)} of {len(rows)} failed: {names}"
    if rows and len(skipped) == len(rows):
        return "skipped", skipped[0].get("reason", "skipped")
    return "ok", (f"{len(skipped)} of {len(rows)} skipped ({skipped[0].get('reason')})" if skipped else "")


@dataclass
class Step:
    name: str
    title: str
    share: float  # weight of its slice of the remaining budget
    run: Callable[["Check", float], List[dict]]  # (check, deadline) -> rows
    min_s: float  # below this much time it is not started


class Check:
    """The steps, the budget, and the JSON + Markdown written after every step."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.start = now()
        self.deadline = self.start + settings.budget_s
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # run directories, exported files
        self.device = torch.device(settings.device)
        self.record: dict = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:],
                             "mode": "dry-run" if settings.dry_run else "gpu", "budget_s": settings.budget_s,
                             "settings": dataclasses.asdict(settings), "environment": environment(self.device),
                             "steps": []}
        self.shared: Dict[str, object] = {}  # what one step leaves for another (run directories)

    def remaining(self) -> float:
        return self.deadline - now()

    def run(self, steps: List[Step]) -> dict:
        chosen = [st for st in steps if st.name in self.s.steps]
        for i, st in enumerate(chosen):
            left = self.remaining()
            # this step's slice of what is left, in proportion to the shares of the steps still to run
            slice_s = left * st.share / sum(x.share for x in chosen[i:])
            entry = {"name": st.name, "title": st.title, "status": "skipped", "reason": "", "seconds": 0.0, "rows": []}
            print(f"[gpu_check] {st.name}: {st.title} (slice {slice_s:.0f} s of {left:.0f} s left)", flush=True)
            t0 = now()
            if left < st.min_s:
                entry["reason"] = f"budget: {left:.0f} s left, the step needs at least {st.min_s:.0f} s"
            else:
                try:
                    if self.s.fail == st.name:
                        raise RuntimeError(f"failure injected with --fail {st.name}")
                    entry["rows"] = st.run(self, now() + slice_s)
                    entry["status"], entry["reason"] = row_status(entry["rows"])
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and the next step runs
                    traceback.print_exc()
                    entry["status"], entry["reason"] = "failed", one_line(exc)
            entry["seconds"] = round(now() - t0, 1)
            print(f"[gpu_check] {st.name}: {entry['status']}" + (f" - {entry['reason']}" if entry["reason"] else ""),
                  flush=True)
            self.record["steps"].append(entry)
            self.write()
        shutil.rmtree(self.work, ignore_errors=True)
        return self.record

    def write(self) -> None:
        from dynammo.io import write_json_atomic, write_text_atomic

        self.record["elapsed_s"] = round(now() - self.start, 1)
        counts = {k: sum(st["status"] == k for st in self.record["steps"]) for k in ("ok", "failed", "skipped")}
        self.record["summary"] = counts
        write_json_atomic(self.out / "gpu_check.json", json_safe(self.record))
        write_text_atomic(self.out / "gpu_check.md", markdown(self.record))


def json_safe(obj):
    """NaN and infinities as strings (strict JSON), everything else as it is."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def environment(device: torch.device) -> dict:
    from dynammo.compute import compute_path
    from dynammo.configure import build_config

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "cpu_count": os.cpu_count(), "commit": git_commit()}
    try:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}")
        env["auto_compute"] = compute_path(build_config({}), device).describe()
    except Exception as exc:  # noqa: BLE001 - no GPU: the steps say so, one by one
        env["error"] = one_line(exc)
    return env


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def child_env() -> dict:
    """A subprocess imports the same dynammo package as this process, installed or not."""
    import dynammo

    env = dict(os.environ)
    src = str(Path(dynammo.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, BENCHMARKS.as_posix()]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    return env
