"""`dynammo sweep` on this machine: the planned runs as `dynammo run` / `dynammo resume` subprocesses,
K at a time, one line per event, stopped together on SIGINT/SIGTERM, one sweep at a time per folder."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from dynammo.errors import UserError
from dynammo.signals import handling_stop_signals
from dynammo.rundir import is_complete, read_results, run_status
from dynammo.sweep.plan import Plan, PlannedRun, config_differences

RUN_LOG = "sweep.log"  # in each run directory: the run's stderr, one block per attempt
LOCK_FILE = ".sweep.lock"  # held while a sweep runs on DIR: two sweeps must not resume the same run
POLL_SECONDS = 0.1


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
        if run_status(run.dir) != "complete":
            return False
        differs = config_differences(run)
        kept = (f"; note: it was made with {', '.join(differs[:3])}{' ...' if len(differs) > 3 else ''}: kept as it "
                f"is (remove {run.dir} to run it again)") if differs else ""
        text = headline_text(read_results(run.dir) or {})
        self.say(f"{self.tag(run)} skip   {run.name}: already complete ({text}){kept}")
        self.outcomes.append(Outcome(run, "skipped", text=text))
        return True

    def _start(self, run: PlannedRun, slot: int) -> Job:
        mode = run_status(run.dir)
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
        results = read_results(run.dir) or {}
        if rc == 0 and is_complete(results):
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


def headline_text(results: dict) -> str:
    """'last acc 45.20' (the protocol's headline metric)."""
    metric = results.get("metric") or "acc"
    value = results.get(f"last_{metric}")
    return f"last {metric} {value:.2f}" if isinstance(value, (int, float)) else f"last {metric} unknown"
