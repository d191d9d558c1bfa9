"""`dynammo sweep`: every (method, seed) of a grid under one protocol, K runs at a time, resumable,
ending with the report of the finished runs.

    dynammo sweep [-c PROTOCOL_OR_FILE ...] --methods M1 M2 ... [--seeds S1 S2 ...] [--jobs K]
                  [--devices 0,1] [key=value ...] --out DIR [--emit-slurm FILE ...]

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
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from dynammo.config import (ALIASES, IGNORED_REFERENCE_KEYS, OPTIONS, all_method_options, load_config,
                            parse_overrides, read_yaml)
from dynammo.errors import UserError
from dynammo.protocols import (DEFAULT_PROTOCOL, PROTOCOL_KEYS, RESULT_NEUTRAL_KEYS, protocol_names,
                               shipped_method_file)
from dynammo.registry import closest
from dynammo.signals import handling_stop_signals

RUN_LOG = "sweep.log"  # in each run directory: the run's stderr, one block per attempt
REPORT_DIR = "report"  # DIR/report/: the report of every finished run under DIR
SLURM_LOG_DIR = "slurm"  # DIR/slurm/: the output of each SLURM array task
LOCK_FILE = ".sweep.lock"  # held while a sweep runs on DIR: two sweeps must not resume the same run
POLL_SECONDS = 0.1


# ---------------------------------------------------------------- the grid


@dataclass
class PlannedRun:
    index: int  # 0-based position in the grid (the SLURM array index)
    method: str  # canonical name: the folder DIR/<method>/
    seed: int
    dir: Path
    overrides: List[str]  # the key=value arguments this method is given
    config: dict  # the resolved config the run gets: compared with an earlier run in its folder

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


@dataclass
class Plan:
    sources: List[str]  # the -c arguments before the method's
    out: Path
    runs: List[PlannedRun]
    protocol: Optional[str]
    notices: List[str] = field(default_factory=list)  # config notes and where each override goes

    def fresh_args(self, run: PlannedRun) -> List[str]:
        """`dynammo run` arguments of one run, composed as benchmarks/compare_methods.py always did."""
        args = ["run"]
        for source in self.sources:
            args += ["-c", source]
        return args + ["-c", run.method, "--out", str(run.dir), f"seed={run.seed}", "progress=false",
                       *run.overrides]


def canonical_methods(names: Sequence[str]) -> List[str]:
    """Canonical names, each once, in the order given; one line for an unknown one."""
    from dynammo.methods import METHODS

    if not names:
        raise UserError("--methods: give at least one method, e.g. --methods finetune replay (see `dynammo list`)")
    return list(dict.fromkeys(METHODS.canonical(n) for n in names))


def check_sources(sources: Sequence[str]) -> None:
    """Each -c is a shipped protocol or a YAML file; methods come from --methods."""
    from dynammo.methods import METHODS

    for source in sources:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            read_yaml(path)  # one line when it is missing or not YAML
        elif source in METHODS:
            raise UserError(f"-c {source} is a method; give the methods with --methods (and the protocol with -c)")
        elif source not in protocol_names():
            raise UserError(f"-c {source}: no such protocol or YAML file{closest(source, protocol_names())}; "
                            f"protocols: {', '.join(protocol_names())}")


def check_method_files(protocol: Optional[str], methods: Sequence[str]) -> None:
    """No method file may set what the protocol fixes: the comparison would not be fair."""
    for method in methods:
        path = shipped_method_file(method, protocol)
        if path is None:
            continue
        clash = sorted(set(read_yaml(path)) & set(PROTOCOL_KEYS))
        if clash:
            raise UserError(f"{path} sets protocol key(s) {', '.join(clash)}; a method file may not change "
                            f"protocol {protocol}")


def route_overrides(overrides: Sequence[str], methods: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Each key=value with the methods it is given to: a general key to every method, a method's key
    only to the swept methods that declare it (a key none of them knows is an error)."""
    from dynammo.methods import METHODS

    declared = {m: METHODS.get(m).options for m in methods}
    routes = []
    for item in overrides:
        parse_overrides([item])  # one line for a malformed override
        key = override_key(item)
        if key == "method":
            raise UserError(f"{item}: give the methods with --methods, not method=")
        if key == "seed":
            raise UserError(f"{item}: give the seeds with --seeds S1 S2 ..., not seed=")
        if key in OPTIONS or key in IGNORED_REFERENCE_KEYS:
            routes.append((item, list(methods)))
            continue
        takers = [m for m in methods if key in declared[m]]
        if not takers:
            owners = all_method_options().get(key)
            hint = (f" (a key of {', '.join(owners)}, not swept)" if owners else
                    closest(key, [*OPTIONS, *(k for opts in declared.values() for k in opts)]))
            raise UserError(f"{item}: '{key}' is neither a general config key nor a key of the swept methods "
                            f"({', '.join(methods)}){hint}; see `dynammo list --keys`")
        routes.append((item, takers))
    return routes


def parse_seeds(tokens: Sequence[str]) -> List[int]:
    seeds = []
    for token in tokens:
        try:
            seed = int(token)
        except ValueError:
            seed = -1
        if seed < 0 or seed > 2**32 - 1:
            raise UserError(f"--seeds: {token!r} is not a seed (a whole number from 0 to 2**32 - 1)")
        seeds.append(seed)
    return list(dict.fromkeys(seeds))


def config_seeds(cfg) -> List[int]:
    return list(cfg.seed) if isinstance(cfg.seed, list) else [cfg.seed]


def method_config(sources: List[str], method: str, overrides: List[str]):
    """The validated config of one method (bad input stops here, before anything runs)."""
    try:
        return load_config([*sources, method], [*overrides, "progress=false"])
    except UserError as exc:
        raise UserError(f"method {method}: {exc}") from None


def check_out(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep's run directories")
    return out


def plan_sweep(sources: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
               out) -> Plan:
    """The grid: one PlannedRun per (method, seed), every config validated. Writes nothing."""
    sources = list(sources) or [DEFAULT_PROTOCOL]
    check_sources(sources)
    methods = canonical_methods(methods)
    out = check_out(out)
    routes = route_overrides(overrides, methods)
    notices = [f"note: {item} is given to {', '.join(takers)} only (the other methods do not declare "
               f"{override_key(item)})" for item, takers in routes if len(takers) < len(methods)]
    runs: List[PlannedRun] = []
    protocol = None
    for method in methods:
        given = [item for item, takers in routes if method in takers]
        cfg = method_config(sources, method, given)
        protocol = protocol or cfg.get("protocol")
        check_method_files(cfg.get("protocol"), [method])
        for seed in seeds or config_seeds(cfg):
            config = {**cfg, "seed": seed}
            runs.append(PlannedRun(len(runs), method, seed, out / method / f"seed{seed}", given, config))
    changed = list(dict.fromkeys(override_key(item) for item in overrides if override_key(item) in PROTOCOL_KEYS))
    if changed and protocol:
        notices.append(f"note: the overrides set protocol key(s) {', '.join(changed)}: where they differ from protocol "
                       f"{protocol}, the runs depart from it and their results.json says so")
    return Plan(sources, out, runs, protocol, notices)


def override_key(item: str) -> str:
    key = item.split("=", 1)[0].strip()
    return ALIASES.get(key, key)


# ---------------------------------------------------------------- the state of a run directory


def recorded_results(run_dir: Path) -> Optional[dict]:
    """results.json, {} when it cannot be read, None when there is none."""
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def run_state(run_dir) -> str:
    """complete | resume | fresh: skip it, `dynammo resume` it, or `dynammo run` it."""
    run_dir = Path(run_dir)
    results = recorded_results(run_dir)
    # a results.json without `status` predates it and was only written complete (as `dynammo report` reads it)
    if results and (results.get("status") or "complete") == "complete" and "acc_matrix" in results:
        return "complete"
    if results is not None or (run_dir / "checkpoints").is_dir():
        return "resume"  # `dynammo run` refuses a folder holding a run; resume also restarts one with no task done
    return "fresh"


def config_differences(run: PlannedRun) -> List[str]:
    """Where the run already in run.dir was made with other values than this sweep gives."""
    path = run.dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        theirs = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ["its config.yaml cannot be read"]
    ours = yaml.safe_load(yaml.safe_dump(run.config, sort_keys=False))
    return [f"{key}={theirs[key]!r} (this sweep: {value!r})" for key, value in ours.items()
            if isinstance(theirs, dict) and key in theirs and key not in RESULT_NEUTRAL_KEYS and theirs[key] != value]


def headline_text(results: dict) -> str:
    """'last acc 45.20' (the protocol's headline metric)."""
    metric = results.get("metric") or "acc"
    value = results.get(f"last_{metric}")
    return f"last {metric} {value:.2f}" if isinstance(value, (int, float)) else f"last {metric} unknown"


# ---------------------------------------------------------------- running K at a time


def cpu_cores() -> int:
    """The CPUs the sweep may use: OMP_NUM_THREADS when the user set it, else the CPUs of this process."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: Optional[int] = None) -> int:
    """Concurrent runs share the cores: OpenMP threads beyond them only slow every run down."""
    return max(1, (cores or cpu_cores()) // jobs)


def job_env(slot: int, threads: int, devices: Sequence[str]) -> Dict[str, str]:
    """What a run's environment adds: its CPU threads and, with --devices, its GPU (slot i of K gets
    devices[i % len(devices)], so K > len(devices) puts several runs on one GPU)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    return env


def parse_devices(text: Optional[str]) -> List[str]:
    if text is None:
        return []
    devices = [d.strip() for d in text.split(",")]
    if not all(devices) or any(" " in d for d in devices):
        raise UserError(f"--devices {text!r}: give GPU ids separated by commas, e.g. --devices 0,1")
    return devices


def _stop_with_parent():
    """A preexec function asking Linux to SIGTERM a run when the sweep dies, even by SIGKILL: no orphan
    keeps writing a run directory that the restarted sweep resumes. None where prctl is missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook():
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the call
            os._exit(1)

    return hook


@dataclass
class Job:
    run: PlannedRun
    slot: int
    mode: str  # fresh | resume
    proc: subprocess.Popen
    started: float
    log_offset: int  # where this attempt's stderr starts in sweep.log


@dataclass
class Outcome:
    run: PlannedRun
    state: str  # skipped | complete | failed | interrupted
    mode: str = ""  # fresh | resume ("" when skipped)
    seconds: float = 0.0
    text: str = ""


class Sweep:
    """Starts the runs K at a time, prints one line per event, stops the runs on SIGINT/SIGTERM."""

    def __init__(self, plan: Plan, jobs: int, devices: Sequence[str], say: Callable[[str], None] = print):
        self.plan, self.jobs, self.devices, self.say = plan, jobs, list(devices), say
        self.threads = threads_per_job(jobs)
        self.outcomes: List[Outcome] = []
        self.signals: List[str] = []  # the SIGINT/SIGTERM received, in order
        self._forwarded = 0
        self._preexec = _stop_with_parent()

    def tag(self, run: PlannedRun) -> str:
        return f"[{run.index + 1}/{len(self.plan.runs)}]"

    def run(self) -> List[Outcome]:
        pending = [r for r in self.plan.runs if not self._skipped(r)]
        running: List[Job] = []
        with self._catch_signals():
            while running or (pending and not self.signals):
                while pending and not self.signals and len(running) < self.jobs:
                    free = min(set(range(self.jobs)) - {j.slot for j in running})
                    running.append(self._start(pending.pop(0), free))
                self._forward_signals(running)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    self.outcomes.append(self._finished(job))
                time.sleep(POLL_SECONDS)
        return self.outcomes

    def _skipped(self, run: PlannedRun) -> bool:
        if run_state(run.dir) != "complete":
            return False
        differs = config_differences(run)
        kept = (f"; note: it was made with {', '.join(differs[:3])}{' ...' if len(differs) > 3 else ''}: kept as it "
                f"is (remove {run.dir} to run it again)") if differs else ""
        text = headline_text(recorded_results(run.dir) or {})
        self.say(f"{self.tag(run)} skip   {run.name}: already complete ({text}){kept}")
        self.outcomes.append(Outcome(run, "skipped", text=text))
        return True

    def _start(self, run: PlannedRun, slot: int) -> Job:
        mode = run_state(run.dir)
        args = ["resume", str(run.dir)] if mode == "resume" else self.plan.fresh_args(run)
        cmd = [sys.executable, "-m", "dynammo", *args]
        env = job_env(slot, self.threads, self.devices)
        run.dir.mkdir(parents=True, exist_ok=True)
        with open(run.dir / RUN_LOG, "ab") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {mode}: "
                      f"{' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}\n".encode())
            log.flush()
            offset = log.tell()
            # a session of its own: a Ctrl-C in the terminal reaches the sweep only, which forwards one SIGTERM
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    env={**os.environ, **env}, start_new_session=True, preexec_fn=self._preexec)
        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if self.devices else ""
        differs = config_differences(run) if mode == "resume" else []
        note = f"; note: it continues with its own config.yaml, which has {', '.join(differs[:3])}" if differs else ""
        self.say(f"{self.tag(run)} start  {run.name} ({mode}){where} -> {run.dir}{note}")
        return Job(run, slot, mode, proc, time.monotonic(), offset)

    def _finished(self, job: Job) -> Outcome:
        run, rc, seconds = job.run, job.proc.returncode, time.monotonic() - job.started
        results = recorded_results(run.dir) or {}
        if rc == 0 and results.get("status") == "complete":
            text = headline_text(results)
            self.say(f"{self.tag(run)} done   {run.name}: {text}, {seconds:.1f} s")
            return Outcome(run, "complete", job.mode, seconds, text)
        last = last_line(run.dir / RUN_LOG, job.log_offset) or exit_text(rc)
        # 130: `dynammo run` saved its state on a signal; any other end after the sweep's own signal is one too
        state = "interrupted" if rc == 130 or self.signals else "failed"
        self.say(f"{self.tag(run)} {state:<6} {run.name} ({exit_text(rc)}, {seconds:.1f} s): {last}; "
                 f"log: {run.dir / RUN_LOG}")
        return Outcome(run, state, job.mode, seconds, last)

    @contextmanager
    def _catch_signals(self):
        def handler(signum, frame):
            self.signals.append(signal.Signals(signum).name)

        with handling_stop_signals(handler):
            yield

    def _forward_signals(self, running: List[Job]) -> None:
        """Each signal the sweep gets, its runs get as SIGTERM: the first saves a checkpoint at the
        next batch and exits, a second stops at once; a third one kills them."""
        while self._forwarded < len(self.signals):
            self._forwarded += 1
            if self._forwarded == 1:
                self.say(f"{self.signals[0]}: stopping the {len(running)} running run(s) (they save a checkpoint "
                         "at the next batch); send it again to stop them at once")
            sig = signal.SIGKILL if self._forwarded >= 3 else signal.SIGTERM
            for job in running:
                if job.proc.poll() is None:
                    job.proc.send_signal(sig)


def exit_text(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"


def last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to `path` after `offset` (a run's last word on stderr)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


@contextmanager
def sweep_lock(out: Path):
    """One sweep at a time on a folder: two would start the same run twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another dynammo sweep is running on {out}; let it finish or stop it first") from None
        yield


def summary_line(outcomes: List[Outcome], total: int, seconds: float) -> str:
    by = {s: [o for o in outcomes if o.state == s] for s in ("skipped", "complete", "failed", "interrupted")}
    resumed = sum(1 for o in by["complete"] if o.mode == "resume")
    done = len(by["skipped"]) + len(by["complete"])
    line = (f"sweep: {done} of {total} runs complete ({len(by['skipped'])} skipped as already complete, {resumed} "
            f"resumed, {len(by['complete']) - resumed} run fresh)")
    for state in ("failed", "interrupted"):
        if by[state]:
            names = [o.run.name for o in sorted(by[state], key=lambda o: o.run.index)]
            line += f", {len(by[state])} {state} ({', '.join(names)})"
    if total - len(outcomes):
        line += f", {total - len(outcomes)} not started"
    return line + f"; {seconds:.1f} s"


# ---------------------------------------------------------------- the report


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


# ---------------------------------------------------------------- SLURM


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
              'state="$("$PYTHON" -m dynammo.sweep state "$run_dir")"',
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


# ---------------------------------------------------------------- the command


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


def sweep_command(args) -> int:
    """`dynammo sweep`: exit 0 when every run is complete, 1 when one failed (or the report could not
    be written), 2 for bad input (nothing written), 130 when stopped by SIGINT/SIGTERM."""
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


def _main(argv: Sequence[str]) -> int:
    """`python -m dynammo.sweep state RUN_DIR` prints complete, resume or fresh (the SLURM script asks it)."""
    if len(argv) == 2 and argv[0] == "state":
        print(run_state(argv[1]))
        return 0
    print("usage: python -m dynammo.sweep state RUN_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
