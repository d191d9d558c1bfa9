"""`dynammo sweep --emit-slurm FILE`: the planned runs as a SLURM job array, one task per run; each task
asks `dynammo sweep --state` whether its run is complete, to resume or to start fresh."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from dynammo.errors import UserError
from dynammo.sweep.plan import Plan

SLURM_LOG_DIR = "slurm"  # DIR/slurm/: the output of each SLURM array task


def slurm_script(plan: Plan, jobs: int, options: Sequence[str] = (), gpus_per_task: Optional[int] = None,
                 python: str = sys.executable, cwd: Optional[Path] = None) -> str:
    """A job array, one task per run; plain `SLURM_ARRAY_TASK_ID=i bash FILE` runs entry i. Each task
    exits 0 when its run is complete, resumes it when it holds a checkpoint, else runs it fresh."""
    runs, q = plan.runs, shlex.quote
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    lines = ["#!/bin/bash",
             f"# dynammo sweep: {len(runs)} run(s) ({', '.join(methods)} x seeds {', '.join(map(str, seeds))}) into "
             f"{plan.out}/<method>/seed<S>/, one array task per run; written by `dynammo sweep --emit-slurm`.",
             "# Submit: sbatch THIS_FILE.  One entry without SLURM: SLURM_ARRAY_TASK_ID=0 bash THIS_FILE",
             "# A complete run exits 0 at once, a run with a checkpoint is resumed, any other starts fresh.",
             "#SBATCH --job-name=dynammo-sweep",
             f"#SBATCH --array=0-{len(runs) - 1}%{jobs}",
             f"#SBATCH --output={(plan.out / SLURM_LOG_DIR).resolve()}/%A_%a.log"]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    lines += [f"#SBATCH {option}" for option in options]
    lines += ["", "set -euo pipefail", f"cd {q(str(cwd or Path.cwd()))}",
              'PYTHON="${DYNAMMO_PYTHON:-}"', f'[ -n "$PYTHON" ] || PYTHON={q(python)}',
              '# the CPUs SLURM gave this task, for torch and OpenMP',
              'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then',
              '  export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK" MKL_NUM_THREADS="$SLURM_CPUS_PER_TASK"', "fi",
              'task="${SLURM_ARRAY_TASK_ID:-}"', 'case "$task" in']
    for run in runs:
        lines.append(f"  {run.index}) run_dir={q(str(run.dir))}  # {run.name}")
        lines.append(f"     fresh=({shlex.join(plan.fresh_args(run))}) ;;")
    lines += [f'  *) echo "error: SLURM_ARRAY_TASK_ID=\'$task\' is not an entry of this sweep (0-{len(runs) - 1})" >&2',
              "     exit 2 ;;",
              "esac",
              'state="$("$PYTHON" -m dynammo sweep --state="$run_dir")"',
              'case "$state" in',
              '  complete) echo "$run_dir is complete: nothing to do"; exit 0 ;;',
              '  resume) exec "$PYTHON" -m dynammo resume "$run_dir" ;;',
              '  fresh) exec "$PYTHON" -m dynammo "${fresh[@]}" ;;',
              '  *) echo "error: cannot tell the state of $run_dir: $state" >&2; exit 2 ;;',
              "esac", ""]
    return "\n".join(lines)


def slurm_option_line(option: str) -> str:
    """'partition=gpu', '--partition=gpu' or '--partition gpu' -> '--partition=gpu' / '--partition gpu'."""
    option = option.strip()
    if not option or "\n" in option or "\r" in option:
        raise UserError(f"--slurm-option {option!r}: give one sbatch option, e.g. --slurm-option=--partition=gpu")
    return option if option.startswith("-") else f"--{option}"


def emit_slurm(plan: Plan, path, jobs: int, options: Sequence[str], gpus_per_task: Optional[int]) -> Path:
    from dynammo.io import write_text_atomic

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--emit-slurm {path} is a folder; give the path of the script to write")
    script = slurm_script(plan, jobs, [slurm_option_line(o) for o in options], gpus_per_task)
    (plan.out / SLURM_LOG_DIR).mkdir(parents=True, exist_ok=True)  # SLURM does not make the --output folder
    write_text_atomic(path, script)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path
