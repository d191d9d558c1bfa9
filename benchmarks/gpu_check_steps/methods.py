"""Step 1, methods: every registered method's tiny run on the device, automatic compute path against
fp32, inside worker processes (the entry script started with --methods-worker) that are replaced
when one dies."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Dict, List

import torch

from gpu_check_steps.common import ROOT, SCRIPT, Check, Settings, child_env, json_safe, now, one_line


def method_protocol(name: str) -> str:
    """digits, or digits_vit for a method that needs a ViT (its shipped method files say which)."""
    from dynammo.methods import METHODS
    from dynammo.methods.prompt_base import PromptMethod
    from dynammo.protocols import METHOD_DIR

    if (METHOD_DIR / name / "digits.yaml").is_file():
        return "digits"
    if (METHOD_DIR / name / "digits_vit.yaml").is_file() or issubclass(METHODS.get(name), PromptMethod):
        return "digits_vit"
    return "digits"


def method_run_args(name: str, s: Settings, amp: str) -> list:
    """The `dynammo run` arguments of a tiny run of `name`: its protocol and shipped method file, every
    training stage cut to s.epochs epochs, fewer images."""
    from dynammo.methods import METHODS

    protocol = method_protocol(name)
    stages = {k: s.epochs for k in METHODS.get(name).options if k.startswith("epochs_") or k == "backbone_epochs"}
    keys = {"epochs": s.epochs, **stages, "device": s.device, "amp": amp, "seed": 0, "progress": "false",
            "plots": "false", "tensorboard": "false"}
    if s.train_per_class:
        keys["max_train_per_class"] = s.train_per_class
    if s.test_per_class:
        keys["max_test_per_class"] = s.test_per_class
    if s.tiny_resnet and protocol == "digits":
        keys.update(backbone="resnet20", img_size=8)
    return ["-c", protocol, "-c", name] + [f"{k}={v}" for k, v in keys.items()]


def finite_state(obj) -> bool:
    """Whether every floating tensor in a (nested) checkpoint state is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(finite_state(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_state(v) for v in obj)
    return True


def run_cli_here(argv: list, log: Path) -> tuple:
    """`dynammo ARGV` in this process, its output into `log`; (exit status, last error line)."""
    from dynammo.cli import main

    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        rc = main(argv)
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "stopped:"))]
    return rc, (errors or lines or [""])[-1]


def one_method_run(name: str, s: Settings, amp: str, run_dir: Path) -> dict:
    """One tiny run; raises RuntimeError with the reason when it fails its checks."""
    from dynammo.rundir import available_checkpoints, load_checkpoint

    device = torch.device(s.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = now()
    rc, last = run_cli_here(["run", "--out", str(run_dir), *method_run_args(name, s, amp)],
                            run_dir.with_name(run_dir.name + ".log"))
    seconds = now() - t0
    if rc != 0:
        raise RuntimeError(f"amp={amp} run exited {rc}: {last}")
    res = json.loads((run_dir / "results.json").read_text())
    if res.get("status") != "complete":
        raise RuntimeError(f"amp={amp} run ended {res.get('status')}: {res.get('stopped_because')}")
    values = [v for row in res["acc_matrix"] for v in row if v is not None] + list(res["acc"])
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise RuntimeError(f"amp={amp} run: non-finite accuracy {values}")
    found = available_checkpoints(run_dir)
    if not finite_state(load_checkpoint(found[max(found)])["state"]):
        raise RuntimeError(f"amp={amp} run: NaN or infinite weights in its last checkpoint")
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if peak == 0:
            raise RuntimeError(f"amp={amp} run allocated nothing on {device}: it did not run on the GPU")
    return {"acc_matrix": res["acc_matrix"], "avg_acc": res["avg_acc"], "last_acc": res["last_acc"],
            "compute": res.get("compute", {}).get("description"), "seconds": round(seconds, 1),
            "peak_gpu_mib": None if peak is None else round(peak, 1)}


def matrix_gap(a: list, b: list) -> tuple:
    """(max, mean) absolute difference over the entries both accuracy matrices define."""
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None and y is not None]
    return max(diffs), sum(diffs) / len(diffs)


def check_method(name: str, s: Settings, work: Path) -> dict:
    row = {"name": name, "protocol": method_protocol(name)}
    try:
        auto = one_method_run(name, s, "auto", work / f"{name}_auto")
        fp32 = one_method_run(name, s, "false", work / f"{name}_fp32")
        gap_max, gap_mean = matrix_gap(auto["acc_matrix"], fp32["acc_matrix"])
        row.update(auto=auto, fp32=fp32, gap_max=round(gap_max, 2), gap_mean=round(gap_mean, 2))
        if gap_mean > s.tolerance:
            row.update(status="failed", reason=f"accuracy matrix differs from fp32 by {gap_mean:.1f} points on "
                                               f"average (tolerance {s.tolerance:g}; up to {gap_max:.1f})")
        else:
            row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a crash is this method's failure, not the check's
        traceback.print_exc()
        row.update(status="failed", reason=one_line(exc))
    return row


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.zeros(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - a poisoned context raises anything
        return False


def methods_worker(work: Path) -> int:
    """The worker process: the methods of work/todo.json one by one, one JSON line per event in
    work/events.jsonl. Exits 3 when the CUDA context no longer works (the parent starts another)."""
    s = Settings(**json.loads((work / "settings.json").read_text()))
    if s.dry_run:
        torch.set_num_threads(1)  # tiny convolutions on shared cores: one thread is much faster
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.cuda.init()  # the peak-memory counters read per run need an initialised allocator
    for name in json.loads((work / "todo.json").read_text()):
        emit(work, {"event": "start", "method": name})
        row = check_method(name, s, work)
        emit(work, {"event": "done", "method": name, "row": json_safe(row)})
        print(f"[gpu_check]   {name}: {row['status']}" + (f" - {row['reason']}" if row.get("reason") else
              f" (last acc {row['auto']['last_acc']:.1f} auto / {row['fp32']['last_acc']:.1f} fp32)"), flush=True)
        if row["status"] == "failed" and not cuda_alive(device):
            return 3
    return 0


def emit(work: Path, event: dict) -> None:
    with open(work / "events.jsonl", "a") as fh:
        fh.write(json.dumps(event) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_events(work: Path) -> list:
    path = work / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]


def step_methods(check: Check, deadline: float) -> List[dict]:
    from dynammo.methods import METHODS

    s = check.s
    names = [METHODS.canonical(m) for m in s.methods] if s.methods else METHODS.names()
    work = check.work / "methods"
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    rows: Dict[str, dict] = {}
    todo = list(names)
    while todo:
        left = deadline - now()
        if left < 5:
            break
        (work / "todo.json").write_text(json.dumps(todo))
        (work / "events.jsonl").unlink(missing_ok=True)
        with open(work / "worker.err", "w") as err:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), "--methods-worker", str(work)],
                                    stderr=err, env=child_env(), cwd=str(ROOT))
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
        started = None
        for ev in read_events(work):
            if ev["event"] == "start":
                started = ev["method"]
            else:
                rows[ev["method"]] = ev["row"]
                started = None
        died = f"the worker process died (exit status {rc}): {last_line(work / 'worker.err')}"
        if started is not None:  # this method's run killed its worker (or ran out of time)
            why = "the step's time slice ran out during its runs" if rc is None else died
            rows[started] = {"name": started, "status": "failed", "reason": why}
        elif rc is None:
            break
        elif rc not in (0, 3):  # died before its first method (no CUDA, say): another worker would too
            rows.update({m: {"name": m, "status": "failed", "reason": died} for m in todo if m not in rows})
        todo = [m for m in todo if m not in rows]
    for m in todo:
        rows[m] = {"name": m, "status": "skipped", "reason": "budget: the step's time slice ran out"}
    check.shared["method_runs"] = work
    return [rows[m] for m in names]


def last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1][:300] if lines else "no output"
