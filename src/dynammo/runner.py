"""One experiment: config -> data/scenario -> method -> engine -> metrics -> run directory."""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from dynammo.config import Config
from dynammo.assembly import build_run
from dynammo.compute import compute_record
from dynammo.console import Console, MutedConsole
from dynammo.cost import count_params, gflops_per_image
from dynammo.deploy import decision
from dynammo.distributed import current_world, init_world, state_digest
from dynammo.engine import Engine
from dynammo.errors import RunInterrupted, UserError
from dynammo.journal import FitJournal, rng_state, set_rng_state
from dynammo.metrics import OPENSET_KEYS, ContinualMetrics, accuracy, task_il_predictions, task_mean_accuracy
from dynammo.methods import METHODS
from dynammo.methods.base import check_eval_mode
from dynammo.openset import expected_calibration_error, known_score, open_set_metrics
from dynammo.protocols import untuned_reason, protocol_record
from dynammo.report import MutedWriter, RunWriter, check_run_dir, format_table, make_plots, versions
from dynammo.signals import handling_stop_signals
from dynammo.io import read_json, write_json_atomic
from dynammo.tracking import Tracker, check_tracking, make_tracker, tensorboard_on


def default_run_dir(cfg) -> Path:
    ds = "+".join(cfg.dataset) if isinstance(cfg.dataset, list) else cfg.dataset
    return Path("runs") / f"{cfg.method}_{ds}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def seeds_of(cfg) -> List[int]:
    return list(cfg.seed) if isinstance(cfg.seed, list) else [cfg.seed]


def run_experiment(cfg: Config, out: Optional[Path], console: Console, notices: Sequence[str] = ()) -> List[dict]:
    """Run every seed; with several seeds each gets out/seed<N>/ and out/summary.json is written. The
    config's notices are printed once the first run can start (rank 0 of a distributed run)."""
    cfg, console = join_world(cfg, console)
    world = current_world()
    out = Path(world.broadcast(str(out) if out is not None else str(default_run_dir(cfg))))  # one name for all ranks
    seeds = seeds_of(cfg)
    if len(seeds) > 1 and (out / "summary.json").exists():
        raise UserError(f"run directory {out} already holds a run; choose another --out or remove it")
    results = []
    for seed in seeds:
        run_cfg = cfg.copy()
        run_cfg["seed"] = seed
        results.append(run_single(run_cfg, out if len(seeds) == 1 else out / f"seed{seed}", console,
                                  notices if not results else ()))
    if len(seeds) > 1:
        summary = summarize(results)
        if world.main:
            write_json_atomic(out / "summary.json", summary)
        m = summary["metric"]
        console.print(f"over {len(seeds)} seeds (mean ± sample std): avg {m} {summary[f'avg_{m}']['mean']:.2f} ± "
                      f"{summary[f'avg_{m}']['std']:.2f}, last {m} {summary[f'last_{m}']['mean']:.2f} ± "
                      f"{summary[f'last_{m}']['std']:.2f}")
    return results


SUMMARY_KEYS = ("avg_acc", "last_acc", "avg_acc_task_mean", "last_acc_task_mean", "avg_mcr", "last_mcr", "forgetting",
                "bwt", "avg_ece", "last_ece")


def mean_std(vals: List[float]) -> dict:
    """Mean and the sample standard deviation (ddof=1, as papers report; None for one value)."""
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
            "values": vals}


def summarize(results: List[dict]) -> dict:
    """summary.json of a seed list: mean ± sample std of every headline metric, for the headline
    classifier and for every extra one (iCaRL's CNN head beside its NME)."""
    first = results[0]
    out = {"method": first["method"], "label": first.get("label", first["method"]), "dataset": first["dataset"],
           "protocol": first.get("protocol"), "metric": first.get("metric", "acc"), "classifier": first.get("classifier"),
           "deviations": first.get("deviations", []), "seeds": [r["seed"] for r in results], "std": "sample (ddof=1)"}

    def block(runs: List[dict]) -> dict:
        return {key: mean_std([r[key] for r in runs]) for key in SUMMARY_KEYS
                if all(r.get(key) is not None for r in runs)}

    out.update(block(results))
    opensets = [r.get("openset") for r in results]
    if all(opensets) and len({o["score"] for o in opensets}) == 1:
        out["openset"] = {"score": opensets[0]["score"], "positive": opensets[0].get("positive", "known")}
        out["openset"].update({f"avg_{k}": mean_std([o[f"avg_{k}"] for o in opensets]) for k in OPENSET_KEYS
                               if all(o.get(f"avg_{k}") is not None for o in opensets)})
    extras = sorted(set.intersection(*(set(r.get("extra") or {}) for r in results)))
    if extras:
        out["extra"] = {name: block([r["extra"][name] for r in results]) for name in extras}
    return out


def prepare(cfg: Config, console: Console):
    """Everything that can fail on bad input, before anything is written: data, scenario, engine,
    method. Returns (data, scenario, engine, method)."""
    return tuple(build_run(cfg, console))


def join_world(cfg: Config, console: Console):
    """Under torchrun: join the process group, put this rank on its device, and let only rank 0
    print. A method that cannot train distributed is refused here, before anything is written."""
    world, device = init_world(cfg.device)
    if not world.distributed:
        return cfg, console
    METHODS.get(cfg.method).check_distributed(cfg)
    cfg = cfg.copy()
    cfg["device"] = device
    return cfg, (console if world.main else MutedConsole())


def run_tracker(cfg, run_dir: Path, console: Console):
    """The run's tracker; the other ranks of a distributed run track nothing (rank 0 does)."""
    return make_tracker(cfg, run_dir, console) if current_world().main else Tracker()


def run_writer(cfg, run_dir: Path, resume: bool = False):
    """The run directory's writer; the other ranks of a distributed run write nothing (rank 0 does)."""
    if not current_world().main:
        return MutedWriter(run_dir)
    return RunWriter(run_dir, cfg, tensorboard=tensorboard_on(cfg), resume=resume)


def run_single(cfg: Config, run_dir: Path, console: Console, notices: Sequence[str] = ()) -> dict:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    check_tracking(cfg)
    data, scenario, engine, method = prepare(cfg, console)
    engine.world.barrier()  # every rank has checked the directory before rank 0 creates it
    progress = Progress.fresh(cfg, data, scenario)
    tracker = run_tracker(cfg, run_dir, console)
    tracker.start(progress.results)  # before anything is written: an unreachable store stops here
    for line in notices:  # every check has passed: the run starts now
        console.print(line)
    writer = run_writer(cfg, run_dir)
    return _run(cfg, data, scenario, engine, method, writer, console, progress, tracker)


def resume_run(run_dir, console: Console, device: Optional[str] = None) -> dict:
    """Continue an interrupted run from its last checkpoint (and its partial checkpoint inside the
    next task, if any); the result equals an uninterrupted run's (bit-for-bit on CPU)."""
    from dynammo.checkpoints import available_checkpoints, check_resume_config, load_checkpoint, read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device:
        cfg["device"] = device
    cfg, console = join_world(cfg, console)
    check_tracking(cfg)
    results_file = run_dir / "results.json"
    recorded = read_json(results_file, "results.json", "delete it: resume writes it again from the checkpoints") \
        if results_file.is_file() else None
    if isinstance(recorded, dict) and recorded.get("status") == "complete":
        raise UserError(f"the run in {run_dir} is complete; nothing to resume (evaluate it with `dynammo eval {run_dir}`)")
    data, scenario, engine, method = prepare(cfg, console)
    progress = Progress.fresh(cfg, data, scenario)
    found = available_checkpoints(run_dir)
    if found:
        ckpt = load_checkpoint(found[max(found)])
        check_same_run(ckpt, cfg, data, scenario, found[max(found)])
        method.load_state_dict(ckpt["state"])
        progress = Progress.restore(ckpt)
        changed = check_resume_config(ckpt, cfg, found[max(found)], run_dir / "config.yaml")
        if changed:  # result-neutral keys (workers, device, ...): allowed, and said in results.json
            progress.results.setdefault("resumed_with", []).append({"task": progress.next_task + 1, "changed": changed})
        # what the run's config says, also for a checkpoint written before open-set metrics existed
        label_scores(progress.metrics, cfg)
        set_rng_state(ckpt["rng"], engine.generator)
    engine.world.barrier()  # every rank has read the checkpoints before rank 0 cleans up
    for stale in (run_dir / "checkpoints").glob(".*.tmp") if engine.world.main else ():  # a write cut short by a kill
        stale.unlink()
    partial_file = run_dir / "checkpoints" / PARTIAL
    partial = None
    if partial_file.is_file():
        partial = load_checkpoint(partial_file)
        check_same_run(partial, cfg, data, scenario, partial_file)
        check_resume_config(partial, cfg, partial_file, run_dir / "config.yaml")
        if partial["task"] != progress.next_task:  # older than the last task checkpoint
            partial = None
    if progress.next_task >= len(scenario) and partial is None:
        raise UserError(f"every task of {run_dir} has a checkpoint; the run only missed its final write: "
                        f"evaluate it with `dynammo eval {run_dir}`")
    tracker = run_tracker(cfg, run_dir, console)
    tracker.start(progress.results)  # an MLflow run continues the run's own (results.json `tracking`)
    writer = run_writer(cfg, run_dir, resume=True)
    writer.rows = list(progress.rows)
    where = f"task {progress.next_task + 1}" + (" (mid-task)" if partial else "")
    console.attach(run_dir / "log.txt")
    console.print(f"resuming {run_dir} at {where}")
    console.detach()
    return _run(cfg, data, scenario, engine, method, writer, console, progress, tracker, partial)


def check_same_run(ckpt: dict, cfg, data, scenario, path) -> None:
    """Refuse a checkpoint of another method, dataset or class order than the run's config."""
    ds_name = "+".join(data.names)
    for what, theirs, ours in (("method", ckpt.get("method"), cfg.method), ("dataset", ckpt.get("dataset"), ds_name),
                               ("class order", ckpt.get("class_order"), scenario.class_order)):
        if theirs != ours:
            raise UserError(f"checkpoint {path} is of {what} {theirs} but the run's config gives {ours}; "
                            "it belongs to another run")


PARTIAL = "partial.pt"


class Progress:
    """What a run has produced so far: metrics, results.json content, metrics.csv rows."""

    def __init__(self, metrics: ContinualMetrics, results: dict, rows: list, next_task: int):
        self.metrics, self.results, self.rows, self.next_task = metrics, results, rows, next_task

    @classmethod
    def fresh(cls, cfg, data, scenario) -> "Progress":
        method_cls = METHODS.get(cfg.method)
        counts = data.class_counts()
        results = {
            "method": cfg.method, "label": method_cls.label(cfg), "protocol": protocol_record(cfg),
            "metric": cfg.metric, "deviations": method_cls.deviations(cfg), "budget": [],
            "untuned": untuned_reason(cfg) is not None, "untuned_reason": untuned_reason(cfg),
            "dataset": "+".join(data.names), "data_split": data.split_text(),
            "class_counts": {"train": [c[1] for c in counts], "test": [c[2] for c in counts]},
            "backbone": cfg.backbone, "seed": cfg.seed,
            "compute": compute_record(cfg),  # autocast dtype and image layout (compute.py)
            "class_order": scenario.class_order, "tasks": scenario.classes_of_tasks(),
            "class_names": scenario.class_names, "cost": [], "versions": versions(), "status": "running",
        }
        metrics = label_scores(ContinualMetrics([(t.start, t.end) for t in scenario.tasks]), cfg)
        return cls(metrics, results, [], 0)

    @classmethod
    def restore(cls, ckpt: dict) -> "Progress":
        metrics = ContinualMetrics([tuple(b) for b in ckpt["progress"]["bounds"]])
        metrics.load_state_dict(ckpt["progress"]["metrics"])
        return cls(metrics, ckpt["progress"]["results"], ckpt["progress"]["rows"], ckpt["task"] + 1)

    def state_dict(self) -> dict:
        return {"bounds": [list(b) for b in self.metrics.bounds], "metrics": self.metrics.state_dict(),
                "results": self.results, "rows": self.rows}


@contextmanager
def stop_on_signals(engine: Engine, console: Console):
    """SIGINT/SIGTERM ask the engine to save and stop at the next batch; a second one (a second or
    more later) stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first = [0.0]

    def handler(signum, frame):
        name = signal.Signals(signum).name
        # within a second it is the same request: torchrun forwards the SIGTERM that SLURM or a
        # `kill` of the process group also sent to every worker directly
        if engine.stop_requested and time.monotonic() - first[0] > 1.0:
            raise KeyboardInterrupt
        if engine.stop_requested:
            return
        first[0] = time.monotonic()
        engine.stop_requested = name
        console.print(f"{name}: saving a checkpoint at the next batch, then stopping (send it again to stop at once)")

    with handling_stop_signals(handler):
        yield


def mark_stopped(writer, status: str, reason: str) -> None:
    """results.json says why the run stopped; what the finished tasks recorded stays as it was."""
    path = writer.dir / "results.json"
    if path.is_file():
        try:
            writer.write_results({**json.loads(path.read_text()), "status": status, "stopped_because": reason})
        except UserError:
            pass  # the disk is full: the previous results.json is still intact


def _run(cfg, data, scenario, engine, method, writer, console, progress, tracker, partial=None) -> dict:
    console.attach(writer.dir / "log.txt")
    tracker.attach(writer)
    status = "failed"
    progress.results["world_size"] = engine.world.size
    journal = None
    if cfg.save_checkpoints:
        ds_name = "+".join(data.names)

        def save_partial(journal_state: dict) -> None:
            writer.save_partial({"kind": "partial", "method": cfg.method, "dataset": ds_name,
                                 "class_order": scenario.class_order, "task": progress.next_task,
                                 "journal": journal_state, "config": dict(cfg)})

        journal = FitJournal(method.capture_training_state, method.restore_training_state, save_partial, engine.world)
        if partial is not None:
            journal.load(partial["journal"])
    engine.attach_run(writer.tb, journal)
    try:
        with stop_on_signals(engine, console):
            results = _train_all_tasks(cfg, method, engine, data, scenario, writer, console, progress, tracker)
        status = "complete"
        return results
    except RunInterrupted as exc:
        status = "interrupted"
        saved = "its state is saved" if cfg.save_checkpoints else "nothing was saved (save_checkpoints=false)"
        mark_stopped(writer, "interrupted", str(exc))
        raise RunInterrupted(f"{exc}; {saved}: continue with `dynammo resume {writer.dir}`") from None
    except KeyboardInterrupt:  # a second signal: stopped at once
        status = "interrupted"
        raise
    except UserError as exc:  # e.g. a diverged loss: the finished tasks' results and checkpoints stay
        mark_stopped(writer, "failed", str(exc))
        raise
    finally:
        tracker.finish(progress.results, status)
        writer.close()
        console.detach()


def check_ranks_agree(method, engine, results: dict, console: Console) -> None:
    """A distributed run's ranks must hold bitwise the same model, memory and RNGs after every task:
    results.json `rank_digests` keeps every rank's digest per task, and a difference is said."""
    digests = engine.world.gather(state_digest({"state": method.state_dict(), "rng": rng_state(engine.generator)}))
    results.setdefault("rank_digests", []).append(digests)
    if len(set(digests)) > 1:
        console.print(f"warning: the {len(digests)} processes hold different states after {engine.task_label}; "
                      "please report this with the run's config.yaml")


def label_scores(metrics: ContinualMetrics, cfg) -> ContinualMetrics:
    """Name the open-set score and the classifier whose accuracy, ECE and open-set metrics these are."""
    method_cls = METHODS.get(cfg.method)
    metrics.openset_score = method_cls.known_score_name if cfg.eval_openset else None
    metrics.headline = method_cls.headline_record(cfg)
    return metrics


def openset_row(metrics: ContinualMetrics) -> dict:
    """metrics.csv's calibration and open-set columns after the latest task (empty cells when absent),
    with the classifier they (and acc, mcr) belong to."""
    openset = metrics.openset[-1] if metrics.openset else None
    return {"classifier": (metrics.headline or {}).get("classifier"), "ece": metrics.ece[-1] if metrics.ece else None,
            "openset_auroc": (openset or {}).get("auroc"), "openset_fpr95": (openset or {}).get("fpr95")}


def scenario_record(data, scenario) -> dict:
    """What rebuilding the model needs without the data: classes, split and input normalisation."""
    return {"class_names": list(data.class_names), "class_order": list(scenario.class_order),
            "sizes": [t.size for t in scenario.tasks], "mean": list(data.mean), "std": list(data.std),
            "input_shape": list(scenario.test.get(torch.tensor([0])).shape[1:])}  # (C, H, W) of uint8 inputs


def evaluate(cfg, method, engine, scenario, task, metrics: ContinualMetrics) -> Optional[float]:
    """Test the method on every class seen up to `task`; adds the row to `metrics`, with the
    calibration error of its predictions and, when `eval_openset`, the open-set metrics of its
    known-score against the test images of the classes not learned yet (the same eval-mode
    forward passes; nothing of it feeds back into training). Returns the task-id accuracy of
    methods that infer the task (ACL, DynaMMo), else None."""
    bounds = [(t.start, t.end) for t in scenario.tasks]
    method.eval_mode()
    check_eval_mode(method)  # else BatchNorm makes the accuracy depend on the test batch
    test = scenario.test_data_seen(task)
    out = engine.apply(method.predict, test, batch_size=cfg.eval_batch_size)  # measures only: nothing feeds training
    y = test.labels
    logits = out["logits"]
    pred = out["pred"].long() if "pred" in out else logits.argmax(1)
    til_pred = None
    if cfg.eval_task_il:
        til_pred = task_il_predictions(out.get("task_il_logits", logits), y, bounds[: task.id + 1])
    extra = {k[len("pred_"):]: v.long() for k, v in out.items() if k.startswith("pred_")}
    metrics.add(task.id, y, pred, til_pred, extra)
    metrics.add_scores(100.0 * expected_calibration_error(decision(out)[1], pred == y),
                       open_set(cfg, method, engine, scenario, task, out))
    if "task_id" in out:
        return accuracy(scenario.task_of_label(y), out["task_id"].long())
    return None


def open_set(cfg, method, engine, scenario, task, seen_out: dict) -> Optional[dict]:
    """AUROC, FPR95, AUPR-In/-Out (percent) of the known-score of the seen classes' test images
    (positive) against the unseen classes'; None when off or no class is left unseen."""
    if not cfg.eval_openset:
        return None
    unseen = scenario.test_data_unseen(task)
    if not len(unseen):
        return None
    unseen_out = engine.apply(method.predict, unseen, batch_size=cfg.eval_batch_size)
    known, unknown = known_score(seen_out), known_score(unseen_out)
    values = open_set_metrics(known, unknown)
    return {**{k: 100.0 * v for k, v in values.items()}, "n_known": len(known), "n_unknown": len(unknown)}


def evaluate_checkpoint(run_dir, task: Optional[int], console: Console, device: Optional[str] = None) -> dict:
    """Recompute the metrics after `task` (1-based; default: the last checkpoint) from its checkpoint."""
    from dynammo.checkpoints import checkpoint_path, load_checkpoint, read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device:
        cfg["device"] = device
    path = checkpoint_path(run_dir, task)
    ckpt = load_checkpoint(path)
    data, scenario, engine, method = prepare(cfg, console)
    check_same_run(ckpt, cfg, data, scenario, path)
    method.load_state_dict(ckpt["state"])
    t = scenario.tasks[ckpt["task"]]
    metrics = label_scores(ContinualMetrics([(k.start, k.end) for k in scenario.tasks]), cfg)
    metrics.acc_matrix = [[None] * len(scenario)] * t.id  # rows of earlier tasks are not recomputed
    task_id_acc = evaluate(cfg, method, engine, scenario, t, metrics)
    out = {"task": t.id + 1, "classes": t.end, "acc": metrics.acc[-1], "mcr": metrics.mcr[-1],
           "task_il_acc": metrics.task_il_acc[-1] if metrics.task_il_acc else None,
           "acc_per_task": metrics.acc_matrix[-1][: t.id + 1], "acc_task_mean": task_mean_accuracy(metrics.acc_matrix)[-1],
           "task_id_acc": task_id_acc, "classifier": metrics.headline["classifier"],
           "extra": {k: m.acc[-1] for k, m in metrics.extra.items()}, "ece": metrics.ece[-1],
           "openset": metrics.openset[-1], "checkpoint": str(path)}
    results_file = run_dir / "results.json"
    if results_file.is_file():
        recorded = json.loads(results_file.read_text()).get("acc") or []
        out["recorded_acc"] = recorded[t.id] if t.id < len(recorded) else None
    return out


def _train_all_tasks(cfg, method, engine, data, scenario, writer, console, progress: Progress, tracker) -> dict:
    metrics, results = progress.metrics, progress.results
    ds_name = "+".join(data.names)
    console.print(f"{cfg.method} on {ds_name}: {data.num_classes} classes, {len(scenario)} tasks "
                  f"{[t.size for t in scenario.tasks]}, {len(scenario.train)} train / {len(scenario.test)} test images, "
                  f"backbone {cfg.backbone}, device {engine.device}, seed {cfg.seed}")
    console.print(f"compute: {engine.compute.describe()}")
    console.print(f"split: {data.split_text()}")
    console.print(data.describe_classes())
    example = engine.test_tf(scenario.test.get(torch.tensor([0])).to(engine.device))
    for task in scenario.tasks[progress.next_task:]:
        engine.begin_task(f"task {task.id + 1}/{len(scenario)}")
        t0 = time.perf_counter()
        method.begin_task(task)
        method.train_task(task)
        method.end_task(task)
        train_seconds = time.perf_counter() - t0
        log = engine.end_task()

        task_id_acc = evaluate(cfg, method, engine, scenario, task, metrics)
        if task_id_acc is not None:
            results.setdefault("task_id_acc", []).append(task_id_acc)

        n_ex, n_bytes = method.memory_stats()
        cost = {
            "params_total": count_params([method.net]),
            "params_trainable": log.params_trainable,
            "inference_gflops": gflops_per_image(method.predict, example),
            "memory_exemplars": n_ex, "memory_bytes": n_bytes, "train_seconds": round(train_seconds, 3),
            "train_images": log.train_images, **method.extra_cost(),
        }
        results["cost"].append(cost)
        if engine.world.distributed:
            check_ranks_agree(method, engine, results, console)
        results.setdefault("budget", []).append(log.stages)
        results.setdefault("diverged_stages", []).extend({"task": task.id + 1, **d} for d in log.diverged)
        results.update(metrics.summary())
        progress.rows.append({"task": task.id + 1, "classes": task.end, "acc": metrics.acc[-1],
                              "acc_task_mean": task_mean_accuracy(metrics.acc_matrix)[-1], "mcr": metrics.mcr[-1],
                              "task_il_acc": metrics.task_il_acc[-1] if metrics.task_il_acc else None,
                              "avg_acc_so_far": float(np.mean(metrics.acc)), **openset_row(metrics), **cost})
        progress.next_task = task.id + 1
        if cfg.save_checkpoints:  # before results.json: a results.json row always has its checkpoint
            writer.save_checkpoint(task.id, {
                "kind": "task", "method": cfg.method, "dataset": ds_name, "class_order": scenario.class_order,
                "task": task.id, "scenario": scenario_record(data, scenario), "state": method.state_dict(),
                "optimizer": engine.last_optimizer_state, "rng": rng_state(engine.generator),
                "progress": progress.state_dict(), "config": dict(cfg),
            })
            writer.remove_partial()
        writer.write_results(results)
        writer.write_rows(progress.rows)
        tracker.log_task(results, task.id)
        engine.world.barrier()  # the task's files are complete before any rank goes on
        til_txt = f", task-IL {metrics.task_il_acc[-1]:.2f}" if metrics.task_il_acc else ""
        if "task_id_acc" in results:
            til_txt += f", task-id {results['task_id_acc'][-1]:.2f}"
        til_txt += f", ECE {metrics.ece[-1]:.2f}"
        if metrics.openset[-1] is not None:
            til_txt += f", open-set AUROC {metrics.openset[-1]['auroc']:.2f}"
        console.print(f"{engine.task_label} done: accuracy on {task.end} seen classes {metrics.acc[-1]:.2f} "
                      f"(mcr {metrics.mcr[-1]:.2f}{til_txt}), {cost['inference_gflops']:.3f} GFLOPs/image, "
                      f"{n_ex} exemplars, {train_seconds:.1f}s")
        if task.id + 1 < len(scenario) and engine.should_stop():
            raise RunInterrupted(f"{engine.stop_requested or 'a signal to another process'} after {engine.task_label}")

    results["status"] = "complete"
    confusion = metrics.last_confusion
    results["confusion"] = confusion.tolist() if confusion is not None else None
    writer.write_results(results)
    if cfg.plots and engine.world.main:
        make_plots(results, confusion, writer.dir / "plots", scenario.class_names)
    console.print(format_table(results))
    console.print(f"run directory: {writer.dir}")
    return results
