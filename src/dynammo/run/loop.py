"""The task loop: train a task, test it, hand its record to every sink; at the end the final record."""
from __future__ import annotations

import time
from typing import List

import numpy as np
import torch

from dynammo.cost import count_params, gflops_per_image
from dynammo.errors import RunInterrupted
from dynammo.metrics import task_mean_accuracy
from dynammo.run.evaluation import evaluate, openset_row
from dynammo.run.progress import Progress
from dynammo.run.sinks import Sink, TaskRecord


def train_all_tasks(cfg, method, engine, scenario, progress: Progress, sinks: List[Sink]) -> dict:
    example = engine.test_tf(scenario.test.get(torch.tensor([0])).to(engine.device))
    for task in scenario.tasks[progress.next_task:]:
        record = train_task(cfg, method, engine, scenario, task, progress, example)
        for sink in sinks:
            sink.task_done(record)
        engine.world.barrier()  # the task's files are complete before any rank goes on
        if task.id + 1 < len(scenario) and engine.should_stop():
            raise RunInterrupted(f"{engine.stop_requested or 'a signal to another process'} after {engine.task_label}")
    results = progress.results
    results["status"] = "complete"
    confusion = progress.metrics.last_confusion
    results["confusion"] = confusion.tolist() if confusion is not None else None
    for sink in sinks:
        sink.run_done(results, confusion)
    return results


def train_task(cfg, method, engine, scenario, task, progress: Progress, example: torch.Tensor) -> TaskRecord:
    """Train and test one task; its results are added to `progress`."""
    metrics, results = progress.metrics, progress.results
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
    results.setdefault("budget", []).append(log.stages)
    results.setdefault("diverged_stages", []).extend({"task": task.id + 1, **d} for d in log.diverged)
    results.update(metrics.summary())
    row = {"task": task.id + 1, "classes": task.end, "acc": metrics.acc[-1],
           "acc_task_mean": task_mean_accuracy(metrics.acc_matrix)[-1], "mcr": metrics.mcr[-1],
           "task_il_acc": metrics.task_il_acc[-1] if metrics.task_il_acc else None,
           "avg_acc_so_far": float(np.mean(metrics.acc)), **openset_row(metrics), **cost}
    progress.rows.append(row)
    progress.next_task = task.id + 1
    return TaskRecord(task, engine.task_label, results, row, cost, metrics, train_seconds, n_ex)
