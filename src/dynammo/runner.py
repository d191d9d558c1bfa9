"""One experiment: config -> data/scenario -> method -> engine -> metrics -> run directory."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from dynammo.config import Config
from dynammo.console import Console
from dynammo.cost import count_params, gflops_per_image
from dynammo.data import load_data
from dynammo.data.scenario import Scenario
from dynammo.data.transforms import make_transforms
from dynammo.engine import Engine, resolve_device, seed_everything
from dynammo.errors import UserError
from dynammo.metrics import ContinualMetrics, accuracy, task_il_predictions
from dynammo.methods import METHODS
from dynammo.report import RunWriter, check_run_dir, format_table, make_plots, versions
from dynammo.io import write_json_atomic


def default_run_dir(cfg) -> Path:
    ds = "+".join(cfg.dataset) if isinstance(cfg.dataset, list) else cfg.dataset
    return Path("runs") / f"{cfg.method}_{ds}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def seeds_of(cfg) -> List[int]:
    return list(cfg.seed) if isinstance(cfg.seed, list) else [cfg.seed]


def run_experiment(cfg: Config, out: Optional[Path], console: Console) -> List[dict]:
    """Run every seed; with several seeds each gets out/seed<N>/ and out/summary.json is written."""
    out = Path(out) if out is not None else default_run_dir(cfg)
    seeds = seeds_of(cfg)
    if len(seeds) > 1 and (out / "summary.json").exists():
        raise UserError(f"run directory {out} already holds a run; choose another --out or remove it")
    results = []
    for seed in seeds:
        run_cfg = cfg.copy()
        run_cfg["seed"] = seed
        results.append(run_single(run_cfg, out if len(seeds) == 1 else out / f"seed{seed}", console))
    if len(seeds) > 1:
        summary = summarize(results)
        write_json_atomic(out / "summary.json", summary)
        console.print(f"over {len(seeds)} seeds: avg acc {summary['avg_acc']['mean']:.2f} ± {summary['avg_acc']['std']:.2f}, "
                      f"last acc {summary['last_acc']['mean']:.2f} ± {summary['last_acc']['std']:.2f}")
    return results


def summarize(results: List[dict]) -> dict:
    out = {"method": results[0]["method"], "dataset": results[0]["dataset"], "seeds": [r["seed"] for r in results]}
    for key in ("avg_acc", "last_acc", "avg_mcr", "last_mcr", "forgetting", "bwt"):
        vals = [r[key] for r in results if r.get(key) is not None]
        if vals:
            out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    return out


def prepare(cfg: Config, console: Console):
    """Everything that can fail on bad input, before anything is written: data, scenario, engine,
    method. Returns (data, scenario, engine, method)."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    method_cls = METHODS.get(cfg.method)
    data = load_data(cfg, cfg.seed)
    scenario = Scenario.from_config(data, cfg, cfg.seed)
    method_cls.check_config(cfg, data.num_classes)
    engine = Engine(cfg, console, device, cfg.seed)
    engine.set_transforms(*make_transforms(data, cfg.augment))
    method = method_cls(cfg, engine, scenario)  # builds the backbone: checks names and pretrained weights
    return data, scenario, engine, method


def run_single(cfg: Config, run_dir: Path, console: Console) -> dict:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    data, scenario, engine, method = prepare(cfg, console)
    writer = RunWriter(run_dir, cfg, tensorboard=cfg.tensorboard)
    engine.tb = writer.tb
    console.attach(run_dir / "log.txt")
    try:
        return _train_all_tasks(cfg, cfg.seed, engine.device, method, engine, data, scenario, writer, console)
    finally:
        writer.close()
        console.detach()


def scenario_record(data, scenario) -> dict:
    """What rebuilding the model needs without the data: classes, split and input normalisation."""
    return {"class_names": list(data.class_names), "class_order": list(scenario.class_order),
            "sizes": [t.size for t in scenario.tasks], "mean": list(data.mean), "std": list(data.std),
            "input_shape": list(scenario.test.get(torch.tensor([0])).shape[1:])}  # (C, H, W) of uint8 inputs


def _train_all_tasks(cfg, seed, device, method, engine, data, scenario, writer, console) -> dict:
    bounds = [(t.start, t.end) for t in scenario.tasks]
    metrics = ContinualMetrics(bounds)
    ds_name = "+".join(data.names)
    console.print(f"{cfg.method} on {ds_name}: {data.num_classes} classes, {len(scenario)} tasks "
                  f"{[t.size for t in scenario.tasks]}, {len(scenario.train)} train / {len(scenario.test)} test images, "
                  f"backbone {cfg.backbone}, device {device}, seed {seed}")
    results = {
        "method": cfg.method, "dataset": ds_name, "backbone": cfg.backbone, "seed": seed,
        "class_order": scenario.class_order, "tasks": scenario.classes_of_tasks(),
        "class_names": scenario.class_names, "cost": [], "versions": versions(), "status": "running",
    }
    example = engine.test_tf(scenario.test.get(torch.tensor([0])).to(device))
    confusion = None
    for task in scenario:
        engine.task_label = f"task {task.id + 1}/{len(scenario)}"
        engine.trained_params = {}
        t0 = time.perf_counter()
        method.begin_task(task)
        method.train_task(task)
        method.end_task(task)
        train_seconds = time.perf_counter() - t0

        method.eval_mode()
        test = scenario.test_data_seen(task)
        out = engine.apply(method.predict, test)
        y = test.labels
        logits = out["logits"]
        pred = out["pred"].long() if "pred" in out else logits.argmax(1)
        til_pred = None
        if cfg.eval_task_il:
            til_scores = out.get("task_il_logits", logits)
            til_pred = task_il_predictions(til_scores, y, bounds[: task.id + 1])
        extra = {k[len("pred_"):]: v.long() for k, v in out.items() if k.startswith("pred_")}
        metrics.add(task.id, y, pred, til_pred, extra)
        if "task_id" in out:  # methods that infer the task (ACL, DynaMMo): how often it is right
            results.setdefault("task_id_acc", []).append(accuracy(scenario.task_of_label(y), out["task_id"].long()))
        confusion = metrics.last_confusion

        n_ex, n_bytes = method.memory_stats()
        cost = {
            "params_total": count_params([method.net]),
            "params_trainable": int(sum(engine.trained_params.values())),
            "inference_gflops": gflops_per_image(method.predict, example),
            "memory_exemplars": n_ex, "memory_bytes": n_bytes, "train_seconds": round(train_seconds, 3),
        }
        results["cost"].append(cost)
        results.update(metrics.summary())
        writer.write_results(results)
        writer.add_row({"task": task.id + 1, "classes": task.end, "acc": metrics.acc[-1], "mcr": metrics.mcr[-1],
                        "task_il_acc": metrics.task_il_acc[-1] if metrics.task_il_acc else None,
                        "avg_acc_so_far": float(np.mean(metrics.acc)), **cost})
        if cfg.save_checkpoints:
            writer.save_checkpoint(task.id, {
                "method": cfg.method, "dataset": ds_name, "class_order": scenario.class_order, "task": task.id,
                "scenario": scenario_record(data, scenario), "state": method.state_dict(),
                "optimizer": engine.last_optimizer_state,
                "rng": {"torch": torch.get_rng_state(), "engine": engine.generator.get_state()},
                "metrics": metrics.summary(), "config": dict(cfg),
            })
        til_txt = f", task-IL {metrics.task_il_acc[-1]:.2f}" if metrics.task_il_acc else ""
        if "task_id_acc" in results:
            til_txt += f", task-id {results['task_id_acc'][-1]:.2f}"
        console.print(f"{engine.task_label} done: accuracy on {task.end} seen classes {metrics.acc[-1]:.2f} "
                      f"(mcr {metrics.mcr[-1]:.2f}{til_txt}), {cost['inference_gflops']:.3f} GFLOPs/image, "
                      f"{n_ex} exemplars, {train_seconds:.1f}s")

    results["status"] = "complete"
    results["confusion"] = confusion.tolist() if confusion is not None else None
    writer.write_results(results)
    if cfg.plots:
        make_plots(results, confusion, writer.dir / "plots", scenario.class_names)
    console.print(format_table(results))
    console.print(f"run directory: {writer.dir}")
    return results
