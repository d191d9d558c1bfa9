"""`dynammo sweep`: every (method, seed) of a grid under one protocol, K runs at a time, resumable,
ending with the report of the finished runs.

    dynammo sweep [-c PROTOCOL_OR_FILE ...] --methods M1 M2 ... [--seeds S1 S2 ...] [--jobs K]
                  [--devices 0,1] [key=value ...] --out DIR [--emit-slurm FILE ...]
    dynammo sweep --state RUN_DIR     complete, resume or fresh: what the sweep does with that run

Layout (docs/sweep.md): DIR/<method>/seed<S>/ is one ordinary run directory (what `dynammo run
--out` writes) plus sweep.log (the stderr of every attempt at it); DIR/report/ is what
`dynammo report DIR --out DIR/report` writes. `dynammo report` finds the runs by their results.json
and groups them by protocol hash and method label, so the folder names carry no meaning of their own.

Each run is a subprocess of the real command line, composed as `dynammo run -c PROTOCOL -c METHOD
--out DIR/<method>/seed<S> seed=S progress=false key=value...` (the protocol first, then the
method's shipped file for it, then the overrides). A run directory whose results.json says
"complete" is skipped, one that holds a checkpoint or an unfinished results.json is continued
with `dynammo resume`, the others start fresh: running the same sweep again after a kill finishes
the work without redoing a finished run.

The grid is planned in plan.py, run here K at a time by local.py or written as a SLURM array by
slurm.py; this module reads the command line and ends with the report.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from dynammo.errors import UserError
from dynammo.sweep.local import Sweep, summary_line, sweep_lock
from dynammo.rundir import run_status
from dynammo.sweep.plan import parse_seeds, plan_sweep
from dynammo.sweep.slurm import emit_slurm

REPORT_DIR = "report"  # DIR/report/: the report of every finished run under DIR


def parse_devices(text: Optional[str]) -> List[str]:
    if text is None:
        return []
    devices = [d.strip() for d in text.split(",")]
    if not all(devices) or any(" " in d for d in devices):
        raise UserError(f"--devices {text!r}: give GPU ids separated by commas, e.g. --devices 0,1")
    return devices


def split_tokens(args) -> Tuple[List[str], List[str], List[str]]:
    """(methods, seeds, overrides): argparse's --methods/--seeds also swallow key=value tokens after them."""
    methods = [t for t in args.methods if "=" not in t]
    seeds = [t for t in args.seeds if "=" not in t]
    stray = [t for t in [*args.methods, *args.seeds] if "=" in t]
    return methods, seeds, stray + list(args.overrides)


def check_options(args, devices: List[str]) -> None:
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give the number of runs at a time, 1 or more")
    if args.gpus_per_task is not None and args.gpus_per_task < 1:
        raise UserError(f"--gpus-per-task {args.gpus_per_task}: give 1 or more")
    if not args.emit_slurm and (args.slurm_option or args.gpus_per_task is not None):
        raise UserError("--slurm-option and --gpus-per-task only go with --emit-slurm FILE")
    if args.emit_slurm and devices:
        raise UserError("--devices has no effect with --emit-slurm (SLURM assigns the GPUs: use --gpus-per-task)")


def print_state(args) -> int:
    """`dynammo sweep --state RUN_DIR`: prints complete, resume or fresh (each SLURM array task asks it)."""
    grid = [*args.config, *args.methods, *args.seeds, *args.overrides, *args.slurm_option]
    if grid or args.jobs != 1 or any(v is not None for v in (args.devices, args.emit_slurm, args.gpus_per_task)):
        raise UserError("--state RUN_DIR takes no other option: it prints complete, resume or fresh for that folder")
    print(run_status(args.state))
    return 0


def sweep_command(args) -> int:
    """`dynammo sweep`: exit 0 when every run is complete, 1 when one failed (or the report could not
    be written), 2 for bad input (nothing written), 130 when stopped by SIGINT/SIGTERM."""
    if args.state is not None:
        return print_state(args)
    methods, seeds, overrides = split_tokens(args)
    devices = parse_devices(args.devices)
    check_options(args, devices)
    plan = plan_sweep(args.config, methods, parse_seeds(seeds), overrides, args.out)
    if args.emit_slurm:
        path = emit_slurm(plan, args.emit_slurm, args.jobs, args.slurm_option, args.gpus_per_task)
        print(f"wrote {path}: a SLURM array of {len(plan.runs)} run(s), {args.jobs} at a time; submit it with "
              f"`sbatch {path}` (one entry here: SLURM_ARRAY_TASK_ID=0 bash {path})")
        return 0
    for line in plan.notices:
        print(line)
    sweep = Sweep(plan, args.jobs, devices)
    gpus = f", GPUs {','.join(devices)} round-robin" if devices else ""
    print(f"sweep: {len(plan.runs)} run(s) ({len({r.method for r in plan.runs})} method(s) x "
          f"{len({r.seed for r in plan.runs})} seed(s)) of protocol {plan.protocol or '(unnamed)'} into "
          f"{plan.out}/<method>/seed<S>/; {args.jobs} at a time, {sweep.threads} CPU thread(s) each{gpus}", flush=True)
    t0 = time.monotonic()
    with sweep_lock(plan.out):
        outcomes = sweep.run()
    print(summary_line(outcomes, len(plan.runs), time.monotonic() - t0), flush=True)
    if sweep.signals:
        print(f"stopped by {sweep.signals[0]}: the same command again finishes the sweep (finished runs are kept, "
              "interrupted ones resumed)")
        return 130
    reported = report_finished(plan.out)
    return 0 if reported and all(o.state in ("skipped", "complete") for o in outcomes) else 1


def report_finished(out: Path) -> bool:
    """`dynammo report OUT --out OUT/report`, in-process, and its tables printed. False when it could
    not be written (no finished run, or OUT/report holds something else)."""
    from dynammo.reporting import discover, make_report, markdown_section, write_report

    found = discover([out])
    if not found.runs:
        print(f"report not written: no finished run under {out}", file=sys.stderr)
        return False
    for line in found.problems:
        print(line, file=sys.stderr)
    try:
        report = make_report([out], found)
        for note in report.notes:
            print(note)
        write_report(report, out / REPORT_DIR)
    except UserError as exc:
        print(f"report not written: {exc}", file=sys.stderr)
        return False
    for section in report.sections:
        print("\n" + markdown_section(section, level=3))
    print(f"report of {sum(len(s.runs) for s in report.sections)} finished runs: {out / REPORT_DIR}/ "
          f"(report.md, report.html, report.csv, report.tex, figures/)")
    return True
