"""Step 2, export: DynaMMo's runs exported; `dynammo predict` of the file and the exported program on
the device agree with the framework's predictions."""
from __future__ import annotations

import io
import subprocess
import sys
import traceback
from pathlib import Path
from typing import List

import torch

from gpu_check_steps.common import ROOT, Check, Settings, child_env, one_line
from gpu_check_steps.methods import method_run_args, run_cli_here


def framework_decisions(run_dir: Path, device: str):
    """(test images, class ids, confidences) of the run's last checkpoint inside the framework, on
    `device` with the run's own compute path."""
    from dynammo.assembly import quiet_console
    from dynammo.prediction import decision
    from dynammo.run.build import prepare
    from dynammo.run.restore import restore_method
    from dynammo.rundir import available_checkpoints, load_checkpoint, read_run_config

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
