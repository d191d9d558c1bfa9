"""Is a self-supervised backbone worth freezing? ACL and DynaMMo on MedNIST (protocol mednist_cpu) with
three backbones, 3 seeds each, on a 2-core CPU:

  (a) `task1`   the protocol's own: a ResNet-18 trained with labels on task 1's data, then frozen
                (`backbone_epochs`, the methods' files for mednist_cpu: 4 epochs);
  (b) `simsiam` a ResNet-18 pretrained without labels by `dynammo pretrain ssl_method=simsiam`;
  (c) `moco_v2` the same with `ssl_method=moco_v2`.

The pretraining images are MedNIST images that belong to NO continual test split: the training split
of seed 1993 minus every image (by name and by content, so exact duplicates too) of the test split
of seeds 1993, 1994 and 1995 (`-c mednist_cpu` gives the three seeds; see docs/pretrain.md), a seeded
subsample of --pretrain-images of them. Labels are never read for training; the k-NN monitor uses
the labeled split of seed 1993 (200 training images per class as the bank, 200 test images per
class classified).

Scenarios (--scenarios):
  protocol   mednist_cpu as shipped: 3 tasks of 2 classes.
  one_class  the same data as 6 tasks of one class (init_cls=1 increment=1), the stream of issue 15:
             (a) is refused there (a one-class first task cannot train a backbone); the script records
             that line and runs `random` (backbone_epochs=0: a random frozen backbone) in its place.

    python benchmarks/pretrain_mednist.py --data-root ../shared/data --out runs/pretrain_mednist
    python benchmarks/pretrain_mednist.py --data-root ../shared/data --out runs/pt_smoke --smoke   # minutes

Every run is a subprocess (`dynammo pretrain`, `dynammo run`) writing its own run directory under
--out; finished ones are skipped and interrupted ones resumed, so the script can be stopped and
started again. At the end it prints (and writes to OUT/table.md and OUT/summary.json) per scenario,
method and backbone: average and last accuracy (mean ± sample std over seeds), the backbone's k-NN
accuracy and its pretraining time, and the continual training time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (1993, 1994, 1995)
SSL = ("simsiam", "moco_v2")


def dynammo(*args, log: Path) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dynammo", *map(str, args)]
    print("$ dynammo " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.stderr:
        with log.open("a") as fh:
            fh.write(proc.stderr)
    print(f"  exit {proc.returncode} after {time.perf_counter() - t0:.0f}s" +
          (f": {proc.stderr.strip().splitlines()[-1]}" if proc.returncode and proc.stderr.strip() else ""), flush=True)
    return proc


def status(path: Path) -> str:
    try:
        return json.loads(path.read_text()).get("status", "?")
    except (OSError, ValueError):
        return "absent"


def pretrain(args, method: str) -> Path:
    out = Path(args.out) / "pretrain" / method
    summary = out / "pretrain.json"
    if status(summary) == "complete":
        return out
    keys = [f"ssl_method={method}", f"data_root={args.data_root}", f"epochs={args.pretrain_epochs}",
            f"ssl_max_images={args.pretrain_images}", f"batch_size={args.pretrain_batch}",
            f"ssl_augment={args.augment}", "progress=false", f"knn_every={args.knn_every}",
            f"knn_bank_per_class={args.knn_per_class}", f"knn_test_per_class={args.knn_per_class}"]
    if method == "moco_v2":
        keys.append(f"moco_momentum={args.moco_momentum}")
    if args.pretrain_lrate:
        keys.append(f"lrate={args.pretrain_lrate}")
    if summary.exists():
        proc = dynammo("pretrain", "--resume", out, log=out.parent / f"{method}.log")
    else:
        proc = dynammo("pretrain", "-c", "mednist_cpu", "--out", out, *keys, log=out.parent / f"{method}.log")
    if proc.returncode != 0:
        raise SystemExit(f"pretraining {method} failed (exit {proc.returncode}); see {out.parent / (method + '.log')}")
    return out


def continual(args, scenario: str, method: str, backbone: str, seed: int, weights) -> dict:
    out = Path(args.out) / scenario / method / backbone / f"seed{seed}"
    results = out / "results.json"
    keys = [f"data_root={args.data_root}", f"seed={seed}", "progress=false", *args.run_overrides]
    if scenario == "one_class":
        keys += ["init_cls=1", "increment=1"]
    if weights is not None:
        keys.append(f"pretrained={weights}")
    elif backbone == "random":
        keys.append("backbone_epochs=0")
    log = out.parent / f"seed{seed}.log"
    if status(results) != "complete":
        if results.exists() or (out / "checkpoints").is_dir():
            proc = dynammo("resume", out, log=log)
        else:
            proc = dynammo("run", "-c", "mednist_cpu", "-c", method, "--out", out, *keys, log=log)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    r = json.loads(results.read_text())
    return {"avg_acc": r["avg_acc"], "last_acc": r["last_acc"],
            "train_seconds": sum(c["train_seconds"] for c in r["cost"])}


def refused_line(args, method: str) -> str:
    """What `dynammo run` says to a one-class first task with the task-1 backbone (nothing is written)."""
    out = Path(args.out) / "one_class" / method / "task1_refused"
    proc = dynammo("run", "-c", "mednist_cpu", "-c", method, "--out", out, f"data_root={args.data_root}",
                   "init_cls=1", "increment=1", "seed=1993", *args.run_overrides,
                   log=Path(args.out) / "one_class" / method / "task1_refused.log")
    return proc.stderr.strip().splitlines()[-1] if proc.returncode else "(not refused)"


def mean_std(vals):
    if not vals:
        return "-"
    m = statistics.mean(vals)
    return f"{m:.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{m:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default="../shared/data", help="the folder holding mednist.tar.gz")
    ap.add_argument("--out", default="runs/pretrain_mednist")
    ap.add_argument("--scenarios", nargs="+", default=["protocol", "one_class"], choices=["protocol", "one_class"])
    ap.add_argument("--methods", nargs="+", default=["acl", "dynammo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--ssl", nargs="+", default=list(SSL), choices=SSL)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-images", type=int, default=10000, help="seeded subsample of the ~30k eligible images")
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-lrate", type=float, default=None, help="default: the papers' base rate x batch / 256")
    ap.add_argument("--augment", default="medical", choices=["natural", "medical"])
    ap.add_argument("--moco-momentum", type=float, default=0.99,
                    help="the paper's 0.999 barely moves the key encoder in a few thousand steps (recorded as a "
                         "deviation in pretrain.json)")
    ap.add_argument("--knn-every", type=int, default=2)
    ap.add_argument("--knn-per-class", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline (numbers meaningless)")
    ap.add_argument("run_overrides", nargs="*", help="key=value added to every `dynammo run`")
    args = ap.parse_args()
    if args.smoke:
        args.pretrain_epochs, args.pretrain_images, args.knn_per_class, args.seeds = 1, 256, 20, args.seeds[:1]
        args.run_overrides = ["max_train_per_class=10", "max_test_per_class=10", "epochs=1", "backbone_epochs=1",
                              "epochs_finetune=1", "memory_size=12", *args.run_overrides]
    t0 = time.perf_counter()
    backbones = {}
    for m in args.ssl:
        out = pretrain(args, m)
        s = json.loads((out / "pretrain.json").read_text())
        backbones[m] = {"weights": out / "backbone.pt", "knn_acc": s["final_knn_acc"],
                        "seconds": s["pretrain_seconds"], "images": s["images"]["description"]}
    rows, refusals = [], {}
    for scenario in args.scenarios:
        for method in args.methods:
            baseline = "task1"
            if scenario == "one_class":
                refusals[method] = refused_line(args, method)
                baseline = "random"
            for backbone in [baseline, *args.ssl]:
                weights = backbones[backbone]["weights"] if backbone in backbones else None
                per_seed = [continual(args, scenario, method, backbone, s, weights) for s in args.seeds]
                ok = [r for r in per_seed if "error" not in r]
                rows.append({"scenario": scenario, "method": method, "backbone": backbone,
                             "seeds": len(ok), "avg_acc": [r["avg_acc"] for r in ok],
                             "last_acc": [r["last_acc"] for r in ok],
                             "train_seconds": [r["train_seconds"] for r in ok],
                             "errors": [r["error"] for r in per_seed if "error" in r],
                             "knn_acc": backbones.get(backbone, {}).get("knn_acc"),
                             "pretrain_seconds": backbones.get(backbone, {}).get("seconds")})
    lines = ["| scenario | method | backbone | k-NN acc | pretrain (s) | avg acc | last acc | train (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knn = f"{r['knn_acc']:.2f}" if r["knn_acc"] is not None else "-"
        pt = f"{r['pretrain_seconds']:.0f}" if r["pretrain_seconds"] is not None else "-"
        lines.append(f"| {r['scenario']} | {r['method']} | {r['backbone']} | {knn} | {pt} | {mean_std(r['avg_acc'])} | "
                     f"{mean_std(r['last_acc'])} | {mean_std(r['train_seconds'])} | {r['seeds']} |")
    notes = [f"pretraining images ({m}): {b['images']}" for m, b in backbones.items()]
    notes += [f"one_class, {m}, task-1 backbone: {line}" for m, line in refusals.items()]
    notes += [f"{r['scenario']} {r['method']} {r['backbone']}: {e}" for r in rows for e in r["errors"]]
    notes.append(f"total wall time {time.perf_counter() - t0:.0f}s (this invocation)")
    table = "\n".join(lines + [""] + notes)
    print(table)
    out = Path(args.out)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
