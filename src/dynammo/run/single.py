"""One run of one seed: a new run (`run_single`) or the resume of an interrupted one (`resume_run`),
both through the same session, task loop and sinks."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from dynammo.config import Config
from dynammo.console import Console
from dynammo.distributed import current_world
from dynammo.errors import UserError
from dynammo.journal import FitJournal, set_rng_state
from dynammo.run.build import join_world, prepare
from dynammo.run.evaluation import label_scores
from dynammo.run.loop import train_all_tasks
from dynammo.run.progress import Progress
from dynammo.run.session import run_session
from dynammo.run.sinks import Sink
from dynammo.run.sinks.console import ConsoleSink
from dynammo.run.sinks.mlflow import MLflowSink, check_tracking
from dynammo.run.sinks.ranks import RankDigests
from dynammo.run.sinks.rundir import RunDirSink
from dynammo.run.sinks.tensorboard import TensorBoardSink, tensorboard_on
from dynammo.rundir import (PARTIAL, MutedRunDir, RunDir, available_checkpoints, check_resume_config,
                                check_run_dir, check_same_run, load_checkpoint, read_results_to_resume,
                                read_run_config, run_header)


def tracking_sinks(cfg, run_dir: Path, console: Console) -> List[Sink]:
    """TensorBoard or MLflow, as `tracking` says; the other ranks of a distributed run track nothing."""
    if not current_world().main:
        return []
    if cfg.get("tracking") == "mlflow":
        return [MLflowSink(cfg, run_dir, console)]
    return [TensorBoardSink(run_dir)] if tensorboard_on(cfg) else []


def open_run_dir(cfg, run_dir: Path, resume: bool = False) -> RunDir:
    """The run directory's writer; the other ranks of a distributed run write nothing (rank 0 does)."""
    return RunDir(run_dir, cfg, resume=resume) if current_world().main else MutedRunDir(run_dir)


def run_single(cfg: Config, run_dir: Path, console: Console, notices: Sequence[str] = ()) -> dict:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    check_tracking(cfg)
    data, scenario, engine, method = prepare(cfg, console)
    engine.world.barrier()  # every rank has checked the directory before rank 0 creates it
    progress = Progress.fresh(cfg, data, scenario)
    trackers = tracking_sinks(cfg, run_dir, console)
    for tracker in trackers:
        tracker.start(progress.results)  # before anything is written: an unreachable store stops here
    for line in notices:  # every check has passed: the run starts now
        console.print(line)
    return _run(cfg, data, scenario, engine, method, open_run_dir(cfg, run_dir), trackers, console, progress)


def resume_run(run_dir, console: Console, device: Optional[str] = None) -> dict:
    """Continue an interrupted run from its last checkpoint (and its partial checkpoint inside the
    next task, if any); the result equals an uninterrupted run's (bit-for-bit on CPU)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device:
        cfg["device"] = device
    cfg, console = join_world(cfg, console)
    check_tracking(cfg)
    read_results_to_resume(run_dir)  # refuses a complete run, and a damaged results.json
    data, scenario, engine, method = prepare(cfg, console)
    header = run_header(cfg, data, scenario)
    progress = Progress.fresh(cfg, data, scenario)
    found = available_checkpoints(run_dir)
    if found:
        ckpt = load_checkpoint(found[max(found)])
        check_same_run(ckpt, header, found[max(found)])
        method.load_state_dict(ckpt["state"])
        progress = Progress.restore(ckpt)
        changed = check_resume_config(ckpt, cfg, found[max(found)], run_dir / "config.yaml")
        if changed:  # result-neutral keys (workers, device, ...): allowed, and said in results.json
            progress.results.setdefault("resumed_with", []).append({"task": progress.next_task + 1, "changed": changed})
        # what the run's config says, also for a checkpoint written before open-set metrics existed
        label_scores(progress.metrics, cfg)
        set_rng_state(ckpt["rng"], engine.generator)
    engine.world.barrier()  # every rank has read the checkpoints before rank 0 cleans up
    partial_file = run_dir / "checkpoints" / PARTIAL
    partial = None
    if partial_file.is_file():
        partial = load_checkpoint(partial_file)
        check_same_run(partial, header, partial_file)
        check_resume_config(partial, cfg, partial_file, run_dir / "config.yaml")
        if partial["task"] != progress.next_task:  # older than the last task checkpoint
            partial = None
    if progress.next_task >= len(scenario) and partial is None:
        raise UserError(f"every task of {run_dir} has a checkpoint; the run only missed its final write: "
                        f"evaluate it with `dynammo eval {run_dir}`")
    trackers = tracking_sinks(cfg, run_dir, console)
    for tracker in trackers:
        tracker.start(progress.results)  # an MLflow run continues the run's own (results.json `tracking`)
    writer = open_run_dir(cfg, run_dir, resume=True)
    writer.remove_stale_writes()
    where = f"task {progress.next_task + 1}" + (" (mid-task)" if partial else "")
    console.attach(run_dir / "log.txt")
    console.print(f"resuming {run_dir} at {where}")
    console.detach()
    return _run(cfg, data, scenario, engine, method, writer, trackers, console, progress, partial)


def _run(cfg, data, scenario, engine, method, run_dir: RunDir, trackers: List[Sink], console, progress: Progress,
         partial: Optional[dict] = None) -> dict:
    header = run_header(cfg, data, scenario)
    files = RunDirSink(cfg, run_dir, method, engine, progress, header, data, scenario)
    sinks = ([RankDigests(method, engine, console)] if engine.world.distributed else []) + [
        files, *trackers, ConsoleSink(cfg, console, engine, data, scenario, run_dir.dir)]
    progress.results["world_size"] = engine.world.size
    journal = None
    if cfg.save_checkpoints:
        journal = FitJournal(method.capture_training_state, method.restore_training_state, files.partial, engine.world)
        if partial is not None:
            journal.load(partial["journal"])
    saved = "its state is saved" if cfg.save_checkpoints else "nothing was saved (save_checkpoints=false)"

    def close(status: str) -> None:
        for sink in sinks:
            sink.close(progress.results, status)

    tb = next((s.tb for s in trackers if isinstance(s, TensorBoardSink)), None)
    with run_session(run_dir.dir, console, engine, journal=journal, tb=tb, mark=run_dir.mark_stopped,
                     resume_hint=lambda: f"{saved}: continue with `dynammo resume {run_dir.dir}`", close=close) as session:
        for sink in sinks:
            sink.open()
        with session.stop_on_signals():
            return train_all_tasks(cfg, method, engine, scenario, progress, sinks)
