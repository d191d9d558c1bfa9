"""The test after each task (accuracies, calibration, open-set detection) and of a saved checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dynammo.console import Console
from dynammo.methods import METHODS
from dynammo.methods.base import check_eval_mode
from dynammo.metrics import ContinualMetrics, accuracy, task_il_predictions, task_mean_accuracy
from dynammo.openset import expected_calibration_error, known_score, open_set_metrics
from dynammo.prediction import decision, extra_predictions


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
    pred, confidence = decision(out)
    til_pred = None
    if cfg.eval_task_il:
        til_pred = task_il_predictions(out.get("task_il_logits", out["logits"]), y, bounds[: task.id + 1])
    metrics.add(task.id, y, pred, til_pred, extra_predictions(out))
    metrics.add_scores(100.0 * expected_calibration_error(confidence, pred == y),
                       open_set(cfg, method, engine, scenario, task, out))
    task_id = out.get("task_id")
    return None if task_id is None else accuracy(scenario.task_of_label(y), task_id.long())


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
    from dynammo.run.build import prepare
    from dynammo.rundir import RESULTS, check_same_run, checkpoint_path, load_checkpoint, read_run_config, run_header

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device:
        cfg["device"] = device
    path = checkpoint_path(run_dir, task)
    ckpt = load_checkpoint(path)
    data, scenario, engine, method = prepare(cfg, console)
    check_same_run(ckpt, run_header(cfg, data, scenario), path)
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
    results_file = run_dir / RESULTS
    if results_file.is_file():
        recorded = json.loads(results_file.read_text()).get("acc") or []
        out["recorded_acc"] = recorded[t.id] if t.id < len(recorded) else None
    return out
