"""The GPU check: one command, prepared for the day a GPU is lent (issue 25), that writes one JSON and
one Markdown table to --out:

1. methods: every registered method (the registry is read at run time, so a method added later is
   included) runs a tiny protocol (digits, few epochs) on the device with the automatic compute path,
   then again in fp32 (amp=false); a crash, a NaN, a run that put nothing on the GPU or an accuracy
   matrix further from the fp32 run's than the tolerance is a failure with the method named. The
   runs are real `dynammo run`s inside worker processes: a worker that dies (a CUDA error poisons
   its context) is replaced for the methods left, so one failure stops nothing else.
2. export: DynaMMo's runs exported with `dynammo export`; `dynammo predict` of the file and the
   exported program moved to the device agree with the framework's predictions on the device.
3. speed: training images/s of dynammo against a bare PyTorch loop on the same model, data and compute
   path, side by side in one process (benchmarks/overhead.py's measure), per backbone and image size.
4. loader: the file-backed 224 px loader alone, with the model, and the model on the same images held
   in memory: whether the GPU waits for data.
5. latency: DynaMMo against ACL at T = 1, 5, 10 tasks: measured inference latency per image beside the
   counted GFLOPs (benchmarks/efficiency.py's build, dynammo.cost's counter).

Every step (and every row inside one) runs in try/except: a failure is recorded with its one-line
reason and the next steps still run. The JSON and the table are rewritten after every step. The time
budget (--budget-s) is shared out over the steps left; what no longer fits is recorded as skipped.

    python benchmarks/gpu_check.py --out DIR [--budget-s 540]       # on a GPU (device cuda)
    python benchmarks/gpu_check.py --out DIR --dry-run              # CPU, tiny settings (CI runs this)

docs/gpu.md says how to run it on a lent GPU machine and holds its output.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "src"):  # the sibling benchmarks; the package even where it is not installed
    if str(_path) not in sys.path:
        sys.path.insert(0 if _path == HERE else len(sys.path), str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from the network

import torch  # noqa: E402

STEP_NAMES = ("methods", "export", "speed", "loader", "latency")


# ------------------------------------------------------------------------------------------ settings


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


# ------------------------------------------------------------------------------------------ steps


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
    env["PYTHONPATH"] = os.pathsep.join([src, HERE.as_posix()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ------------------------------------------------------------------------------------------ 1. methods


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
    from dynammo.run.rundir import available_checkpoints, load_checkpoint

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
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--methods-worker", str(work)],
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


# ------------------------------------------------------------------------------------------ 2. export


def framework_decisions(run_dir: Path, device: str):
    """(test images, class ids, confidences) of the run's last checkpoint inside the framework, on
    `device` with the run's own compute path."""
    from dynammo.assembly import quiet_console
    from dynammo.prediction import decision
    from dynammo.run.build import prepare
    from dynammo.run.restore import restore_method
    from dynammo.run.rundir import available_checkpoints, load_checkpoint, read_run_config

    cfg = read_run_config(run_dir)
    cfg["device"] = device
    _, scenario, engine, _ = prepare(cfg, quiet_console())
    found = available_checkpoints(run_dir)
    method = restore_method(cfg, load_checkpoint(found[max(found)]), device=str(engine.device))
    engine.compute.prepare_module(method.net)
    test = scenario.test_data_seen(scenario.tasks[-1])
    pred, conf = decision(engine.apply(method.predict, test))
    return test, pred, conf


def write_pngs(folder: Path, images: torch.Tensor) -> List[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, img in enumerate(images):
        arr = img.numpy()
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        path = folder / f"img_{k:05d}.png"
        Image.fromarray(arr.copy()).save(path)
        files.append(path)
    return files


def run_cli_sub(check: Check, args: list) -> subprocess.CompletedProcess:
    """`dynammo ARGS` in a fresh process, stopped when the overall budget runs out."""
    return subprocess.run([sys.executable, "-m", "dynammo", *args], capture_output=True, text=True,
                          timeout=max(5.0, check.remaining() - 5), env=child_env(), cwd=str(ROOT))


def compare_predictions(name: str, pred, conf, e_pred, e_conf, s: Settings, conf_tol: float) -> dict:
    agree = float((e_pred.cpu() == pred).double().mean())
    gap = float((e_conf.cpu().float() - conf.float()).abs().max())
    row = {"name": name, "images": len(pred), "agreement": round(agree, 4), "conf_gap": round(gap, 5)}
    if agree < s.export_agreement or gap > conf_tol:
        row.update(status="failed", reason=f"{100 * agree:.1f}% of classes agree (need {100 * s.export_agreement:g}%), "
                                           f"confidences differ by up to {gap:.4f} (tolerance {conf_tol:g})")
    else:
        row["status"] = "ok"
    return row


def export_rows(check: Check, label: str, run_dir: Path, conf_tol: float) -> List[dict]:
    from dynammo.deploy import load_exported

    s = check.s
    model = check.work / f"export_{label}.pt"
    rc, last = run_cli_here(["export", str(run_dir), "--out", str(model)], check.work / f"export_{label}.log")
    if rc != 0:
        raise RuntimeError(f"`dynammo export` exited {rc}: {last}")
    test, pred, conf = framework_decisions(run_dir, s.device)
    files = write_pngs(check.work / f"images_{label}", test.images)
    proc = run_cli_sub(check, ["predict", str(model), str(files[0].parent), "--csv"])
    rows = []
    if proc.returncode != 0:
        rows.append({"name": f"{label}: dynammo predict (CPU)", "status": "failed",
                     "reason": f"`dynammo predict` exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"})
    else:
        import csv

        by_file = {Path(r["image"]).name: r for r in csv.DictReader(io.StringIO(proc.stdout))}
        got = [by_file[f.name] for f in files]
        rows.append(compare_predictions(f"{label}: dynammo predict (CPU)", pred, conf,
                                        torch.tensor([int(r["class_id"]) for r in got]),
                                        torch.tensor([float(r["confidence"]) for r in got]), s, conf_tol))
    # the exported program itself, moved to the device (what a GPU deployment of the file runs)
    name = f"{label}: exported program on {s.device}"
    try:
        load_exported(model)  # the framework's checks of the file (format, nothing in it that would execute)
        program = torch.export.load(io.BytesIO(model.read_bytes()))
        from torch.export.passes import move_to_device_pass

        module = move_to_device_pass(program, s.device).module()
        with torch.no_grad():
            e_pred, e_conf = module(test.images.to(s.device))
        rows.append(compare_predictions(name, pred, conf, e_pred, e_conf, s, conf_tol))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        rows.append({"name": name, "status": "failed", "reason": one_line(exc)})
    return rows


def step_export(check: Check, deadline: float) -> List[dict]:
    s = check.s
    rows = []
    for label, amp, tol in (("auto", "auto", s.export_conf_auto), ("fp32", "false", s.export_conf_fp32)):
        run_dir = Path(check.shared.get("method_runs", check.work / "methods")) / f"dynammo_{label}"
        if check.remaining() < 20:  # short and bounded: only the overall budget stops it
            rows.append({"name": f"{label}: export", "status": "skipped", "reason": "budget: the overall budget ran out"})
            continue
        try:
            if not (run_dir / "results.json").is_file():  # the methods step did not run DynaMMo: run it here
                run_dir = check.work / f"export_run_{label}"
                rc, last = run_cli_here(["run", "--out", str(run_dir), *method_run_args("dynammo", s, amp)],
                                        check.work / f"export_run_{label}.log")
                if rc != 0:
                    raise RuntimeError(f"`dynammo run` exited {rc}: {last}")
            rows += export_rows(check, label, run_dir, tol)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"name": f"{label}: export", "status": "failed", "reason": one_line(exc)})
    return rows


# ------------------------------------------------------------------------------------------ 3. speed


def parse_model(spec: str) -> tuple:
    """backbone@size:batch:epochs -> (backbone, size, batch, epochs)."""
    backbone, rest = spec.split("@")
    size, batch, epochs = (rest.split(":") + ["64", "1"])[:3]
    return backbone, int(size), int(batch), int(epochs)


def step_speed(check: Check, deadline: float) -> List[dict]:
    from dynammo.configure import load_config
    from overhead import measure

    s = check.s
    specs = list(s.speed_models)
    rows = []
    for i, spec in enumerate(specs):
        row = {"name": spec}
        left = deadline - now()
        if left < 10:
            row.update(status="skipped", reason="budget: the step's time slice ran out")
            rows.append(row)
            continue
        try:
            backbone, size, batch, epochs = parse_model(spec)
            row.update(backbone=backbone, img_size=size)
            if backbone.startswith("vit") and check.device.type == "cuda":
                free = torch.cuda.mem_get_info(check.device)[0] / 2**30
                if free < s.vit_min_free_gib:
                    row.update(status="skipped", reason=f"memory: {free:.0f} GiB free, needs {s.vit_min_free_gib:g}")
                    rows.append(row)
                    continue
            # task 1 = all 10 digits classes, upsampled to the size; Replay's step (a plain CE step)
            cfg = load_config(["digits", "replay"], [
                f"backbone={backbone}", f"img_size={size}", "init_cls=10", "increment=1", f"batch_size={batch}",
                "scheduler=none", f"device={s.device}", "progress=false", "seed=0", "amp=auto", "memory_format=auto",
                *([f"max_train_per_class={s.train_per_class}"] if s.train_per_class else [])])
            r = measure(cfg, s.speed_rounds, epochs=epochs, no_aug=False)
            row.update(status="ok", batch_size=batch, images=r["images"], epochs=r["epochs"], rounds=r["rounds"],
                       compute=r["compute"], framework_img_s=round(r["framework"], 1), bare_img_s=round(r["bare"], 1),
                       ratio=round(r["framework"] / r["bare"], 3))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            msg = one_line(exc)
            oom = "out of memory" in msg.lower()
            row.update(status="skipped" if oom else "failed", reason=("memory: " if oom else "") + msg)
        finally:
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_check]   speed {spec}: {row['status']} "
              + (f"{row['framework_img_s']} vs {row['bare_img_s']} img/s" if row["status"] == "ok" else row["reason"]),
              flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ 4. loader


def find_mednist(s: Settings) -> Optional[Path]:
    """The folder holding mednist.tar.gz: --data-root, $DYNAMMO_SHARED_DATA, /work/shared/data, ../shared/data."""
    cands = [s.data_root, os.environ.get("DYNAMMO_SHARED_DATA"), "/work/shared/data", str(ROOT.parent / "shared" / "data")]
    for c in cands:
        if c and (Path(c) / "mednist.tar.gz").is_file():
            return Path(c)
    return None


class UtilisationSampler:
    """The GPU's utilisation (torch.cuda.utilization, through NVML) sampled every 0.2 s in a thread."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML: no utilisation figure
                return

    def __enter__(self):
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> Optional[float]:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def step_loader(check: Check, deadline: float) -> List[dict]:
    from dynammo.assembly import build_run
    from dynammo.configure import load_config
    from dynammo.data.loader import iterate_batches
    from dynammo.optim import OptimSettings
    from loader_speed import write_images

    s = check.s
    mednist = find_mednist(s)
    if mednist is not None:
        classes = 6
        source = f"MedNIST ({mednist / 'mednist.tar.gz'}), JPEGs decoded per batch"
        data_keys = ["dataset=mednist", f"data_root={mednist}", f"max_train_per_class={max(1, s.loader_images // 6)}"]
    else:
        classes = 4
        root = check.work / "jpegs"
        write_images(root, s.loader_images, (500, 375), classes=classes)
        source = (f"synthetic: {s.loader_images} generated 500x375 JPEGs in a temporary ImageFolder layout "
                  "(MedNIST not found)")
        data_keys = ["dataset=folder", f"data_root={root}", "test_fraction=0.05"]
    workers = min(s.loader_workers, os.cpu_count() or 1)
    cfg = load_config(None, ["method=replay", "backbone=resnet18", f"img_size={s.loader_img_size}", "in_memory=false",
                             "normalize=imagenet", f"init_cls={classes}", "increment=1", f"num_workers={workers}",
                             f"batch_size={s.loader_batch}", "epochs=1", "scheduler=none", f"device={s.device}",
                             "progress=false", "seed=0", "memory_size=10", "max_test_per_class=2", *data_keys])
    _, scenario, engine, method = build_run(cfg, augment=True)
    task = scenario.tasks[0]
    method.begin_task(task)
    files = method.training_set(task)
    settings = OptimSettings.from_config(cfg)
    device = engine.device

    def loader_only() -> float:
        gen = torch.Generator().manual_seed(0)
        sync(device)
        t0, n = now(), 0
        for raw, _, _ in iterate_batches(files, s.loader_batch, shuffle=True, generator=gen, num_workers=workers):
            engine.train_tf(raw.to(device, non_blocking=True), gen)  # augmentation on the device, as training does
            n += len(raw)
        sync(device)
        return n / (now() - t0)

    def with_model(data) -> tuple:
        method.train_mode()
        with UtilisationSampler(device) as util:
            sync(device)
            t0 = now()
            engine.fit(method.net.parameters(), data, method.step, settings)
            sync(device)
            rate = len(data) / (now() - t0)
        return rate, util.mean()

    rows = [{"name": "source", "status": "ok", "source": source, "images": len(files), "workers": workers,
             "img_size": s.loader_img_size, "batch_size": s.loader_batch, "compute": engine.compute.describe()}]
    measures = [("loader alone (decode, resize, to device, augment on device)", loader_only),
                ("loader + ResNet-18 training (files decoded per batch)", lambda: with_model(files))]
    in_memory = {}
    for name, fn in measures + [("ResNet-18 training on the same images held in memory",
                                 lambda: with_model(in_memory.setdefault("set", files.materialize())))]:
        row = {"name": name}
        if deadline - now() < 5:
            row.update(status="skipped", reason="budget: the step's time slice ran out")
        else:
            try:
                fn()  # warm-up (workers, cuDNN autotune)
                out = fn()
                rate, util = out if isinstance(out, tuple) else (out, None)
                row.update(status="ok", img_s=round(rate, 1), gpu_util_pct=util)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row.update(status="failed", reason=one_line(exc))
        print(f"[gpu_check]   loader: {name}: {row.get('img_s', row.get('reason'))}", flush=True)
        rows.append(row)
    files_rate, memory_rate = rows[2].get("img_s"), rows[3].get("img_s")
    if files_rate and memory_rate:
        ratio = files_rate / memory_rate
        rows[0]["files_over_memory"] = round(ratio, 3)
        rows[0]["gpu_waits_for_data"] = ratio < 0.9  # training from files >10% slower than from memory
    return rows


# ------------------------------------------------------------------------------------------ 5. latency


def step_latency(check: Check, deadline: float) -> List[dict]:
    from dynammo.cost import gflops_per_image
    from efficiency import build

    s = check.s
    t_max = max(s.latency_tasks)
    methods = {n: build(n, t_max, s.latency_img_size, s.device) for n in ("acl", "dynammo")}
    device = check.device
    rows, grown = [], {n: 0 for n in methods}
    for t in sorted(s.latency_tasks):
        row = {"name": f"T={t}", "tasks": t}
        if deadline - now() < 3:
            rows.append({**row, "status": "skipped", "reason": "budget: the step's time slice ran out"})
            continue
        try:
            for n, (m, tasks) in methods.items():
                while grown[n] < t:
                    m.grow(tasks[grown[n]])
                    grown[n] += 1
                m.eval_mode()
                compute = m.engine.compute
                x = torch.randn(s.latency_batch, 3, s.latency_img_size, s.latency_img_size, device=device)
                if compute.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                row[f"{n}_gflops"] = round(gflops_per_image(m.predict, x), 4)
                row[f"{n}_ms_batch1"] = round(1e3 * time_calls(m, x[:1], s.latency_calls, device), 3)
                row[f"{n}_ms_per_image_batch{s.latency_batch}"] = round(
                    1e3 * time_calls(m, x, max(1, s.latency_calls // 3), device) / len(x), 4)
                row["compute"] = compute.describe()
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row.update(status="failed", reason=one_line(exc))
        print(f"[gpu_check]   latency T={t}: {row['status']}", flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def time_calls(method, x: torch.Tensor, calls: int, device: torch.device) -> float:
    """Median seconds of method.predict(x) under its compute path, after warm-up calls."""
    times = []
    with method.engine.autocast():
        for i in range(calls + 3):
            sync(device)
            t0 = time.perf_counter()
            method.predict(x)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


STEPS = [
    Step("methods", "every registered method on the device, auto compute path against fp32", 60, step_methods, 20),
    Step("export", "dynammo export on a run trained on the device; predict agrees with the framework", 10, step_export, 20),
    Step("speed", "training images/s, dynammo against a bare PyTorch loop, same model, data and compute path",
         18, step_speed, 15),
    Step("loader", "file-backed loader: alone, with the model, against in-memory images", 8, step_loader, 10),
    Step("latency", "DynaMMo against ACL: inference latency per image beside the counted GFLOPs", 8, step_latency, 8),
]


# ------------------------------------------------------------------------------------------ report


def markdown(record: dict) -> str:
    env = record["environment"]
    what = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"# GPU check ({record['mode']})", "",
             f"Device: {what} ({env.get('device')}); torch {env.get('torch')}, CUDA {env.get('cuda')}; "
             f"auto compute path: {env.get('auto_compute', env.get('error'))}; commit {env.get('commit')}.",
             f"Budget {record['budget_s']:g} s, elapsed {record.get('elapsed_s', 0):g} s. "
             f"Steps: {record.get('summary')}.", "",
             "| step | status | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {st['name']} | {st['status']} | {st['seconds']} | {cell(st['reason'])} |" for st in record["steps"]]
    for st in record["steps"]:
        lines += ["", f"## {st['name']}: {st['title']}", ""]
        render = RENDER.get(st["name"], render_generic)
        lines += render(st["rows"]) if st["rows"] else [f"{st['status']}: {st['reason']}"]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_methods(rows: List[dict]) -> List[str]:
    out = ["| method | protocol | status | last acc auto | last acc fp32 | max / mean gap (points) | auto path | "
           "seconds auto / fp32 | peak GPU MiB | reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, f = r.get("auto") or {}, r.get("fp32") or {}
        gap = f"{r['gap_max']} / {r['gap_mean']}" if "gap_max" in r else ""
        out.append(f"| {r['name']} | {cell(r.get('protocol'))} | {r['status']} | {cell(a.get('last_acc'))} | "
                   f"{cell(f.get('last_acc'))} | {gap} | {cell(a.get('compute'))} | {cell(a.get('seconds'))} / "
                   f"{cell(f.get('seconds'))} | {cell(a.get('peak_gpu_mib'))} | {cell(r.get('reason'))} |")
    return out


def render_speed(rows: List[dict]) -> List[str]:
    out = ["| backbone @ size | batch | images x epochs | dynammo img/s | bare img/s | dynammo / bare | compute | status |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {cell(r.get('batch_size'))} | {cell(r.get('images'))} x {cell(r.get('epochs'))} | "
                   f"{cell(r.get('framework_img_s'))} | {cell(r.get('bare_img_s'))} | {cell(r.get('ratio'))} | "
                   f"{cell(r.get('compute'))} | {r['status']} {cell(r.get('reason'))} |")
    return out


def render_latency(rows: List[dict]) -> List[str]:
    out = ["| T | ACL GFLOPs | DynaMMo GFLOPs | ACL ms (batch 1) | DynaMMo ms (batch 1) | ACL ms/image (batch) | "
           "DynaMMo ms/image (batch) | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = {n: next((v for k, v in r.items() if k.startswith(f"{n}_ms_per_image")), "") for n in ("acl", "dynammo")}
        out.append(f"| {r.get('tasks', r['name'])} | {cell(r.get('acl_gflops'))} | {cell(r.get('dynammo_gflops'))} | "
                   f"{cell(r.get('acl_ms_batch1'))} | {cell(r.get('dynammo_ms_batch1'))} | {cell(per['acl'])} | {cell(per['dynammo'])} | "
                   f"{r['status']} {cell(r.get('reason'))} |")
    return out


def render_generic(rows: List[dict]) -> List[str]:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return out


RENDER = {"methods": render_methods, "speed": render_speed, "latency": render_latency}


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny settings (what CI runs)")
    ap.add_argument("--budget-s", type=float, help="overall time budget in seconds (default 540; dry run 300)")
    ap.add_argument("--device", help="default cuda (dry run: cpu)")
    ap.add_argument("--methods", nargs="+", help="only these methods (default: every registered one)")
    ap.add_argument("--steps", nargs="+", choices=STEP_NAMES, help="only these steps (default: all)")
    ap.add_argument("--speed-models", nargs="+", help="backbone@size:batch:epochs, e.g. resnet18@224:64:2")
    ap.add_argument("--fail", choices=STEP_NAMES, help="make this step fail on purpose (checks that the rest still run)")
    ap.add_argument("--data-root", help="folder holding mednist.tar.gz (default: looked for in ../shared/data)")
    ap.add_argument("--tolerance", type=float, help="accuracy points: mean |auto - fp32| over the accuracy matrix "
                                                    "(default 10)")
    ap.add_argument("--methods-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.methods_worker:
        return args
    if not args.out:
        ap.error("--out DIR is required")
    given = {k: v for k, v in {"budget_s": args.budget_s, "device": args.device, "methods": args.methods,
                               "steps": args.steps, "speed_models": args.speed_models, "fail": args.fail,
                               "data_root": args.data_root, "tolerance": args.tolerance}.items() if v is not None}
    return Settings.dry(args.out, **given) if args.dry_run else Settings(out=args.out, **given)


def main(argv=None) -> int:
    parsed = parse_args(argv)
    if isinstance(parsed, argparse.Namespace):  # a worker of the methods step
        return methods_worker(Path(parsed.methods_worker))
    if parsed.dry_run:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    check = Check(parsed)
    print(f"[gpu_check] {check.record['mode']} on {check.record['environment'].get('gpu') or parsed.device}, "
          f"budget {parsed.budget_s:g} s, writing {check.out}", flush=True)
    record = check.run(STEPS)
    print(f"[gpu_check] done in {record['elapsed_s']:g} s: {record['summary']}; {check.out / 'gpu_check.md'}", flush=True)
    return 0 if record["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
