"""Per-task test accuracy of a run's checkpoint, as recorded and under an intervention, to find out
why a method ranks where it does (docs/results_mednist.md uses it for GEM and WA).

    python benchmarks/probe_checkpoint.py RUN_DIR [--task N] [--bn-batch-stats] [--undo-wa-alignment]

--bn-batch-stats   BatchNorm normalises with the statistics of shuffled test batches of every seen
                   class (instead of its running statistics).
--undo-wa-alignment  divides WA's new-class weight rows by the gamma its log recorded for that task.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from dynammo.console import Console
from dynammo.metrics import ContinualMetrics
from dynammo.prediction import predicted_class
from dynammo.run.build import prepare
from dynammo.rundir import checkpoint_path, load_checkpoint, read_run_config


def per_task_accuracy(method, engine, scenario, task, batch_stats: bool) -> dict:
    """Accuracy on each seen task's test classes, with the framework's decision rule and metric."""
    test = scenario.test_data_seen(task)
    method.eval_mode()
    if batch_stats:
        for m in method.net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0  # use the batch's statistics, keep the running ones
        # shuffled, so that every batch mixes the seen classes (the test set is stored class by class)
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        out = engine.apply(method.predict, test)
    pred = predicted_class(out)
    metrics = ContinualMetrics([(t.start, t.end) for t in scenario.tasks])
    metrics.add(task.id, test.labels, pred)
    return {i + 1: round(a, 2) for i, a in enumerate(metrics.acc_matrix[0][: task.id + 1])}


def wa_gamma(run_dir: Path, task: int) -> float:
    found = re.findall(rf"task {task}/\d+ weight aligning: gamma ([0-9.]+)", (run_dir / "log.txt").read_text())
    if not found:
        raise SystemExit(f"{run_dir}/log.txt records no weight-aligning gamma for task {task}")
    return float(found[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--task", type=int, help="1-based task (default: the last checkpoint)")
    ap.add_argument("--bn-batch-stats", action="store_true")
    ap.add_argument("--undo-wa-alignment", action="store_true")
    args = ap.parse_args()
    cfg = read_run_config(args.run_dir)
    data, scenario, engine, method = prepare(cfg, Console(progress="false", quiet=True))
    ckpt = load_checkpoint(checkpoint_path(args.run_dir, args.task))
    method.load_state_dict(ckpt["state"])
    task = scenario.tasks[ckpt["task"]]
    print(f"{cfg.method} seed {cfg.seed} after task {task.id + 1}: per-task accuracy")
    print("  as recorded        :", per_task_accuracy(method, engine, scenario, task, False))
    if args.undo_wa_alignment:
        gamma = wa_gamma(args.run_dir, task.id + 1)
        fc = method.net.head.fc
        print(f"  weight row norms   : {[round(v, 3) for v in fc.weight.norm(dim=1).tolist()]} (gamma {gamma})")
        with torch.no_grad():
            fc.weight[task.start:] /= gamma
        print("  alignment undone   :", per_task_accuracy(method, engine, scenario, task, False))
    if args.bn_batch_stats:
        print("  BN batch statistics:", per_task_accuracy(method, engine, scenario, task, True))


if __name__ == "__main__":
    main()
