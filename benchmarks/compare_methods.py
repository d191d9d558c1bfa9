"""Run several methods on one setting (same data, split, seeds) through the real CLI and print a
markdown table of mean ± std of average and last accuracy, with cost after the last task.

    python benchmarks/compare_methods.py --config-name mednist --methods joint finetune replay \
        --seeds 1993 1994 1995 --out runs/compare -- data_root=../shared/data
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-name", default="mednist", help="configs/<method>/<NAME>.yaml")
    ap.add_argument("--methods", nargs="+", default=["joint", "finetune", "replay"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--plot", help="also write a PNG of each method's accuracy after every task (mean ± std over seeds)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    args = ap.parse_args()
    rows = []
    for method in args.methods:
        out = Path(args.out) / method
        if not (out / "summary.json").exists():
            cmd = [sys.executable, "-m", "dynammo", "run", "-c", f"configs/{method}/{args.config_name}.yaml",
                   "--out", str(out), f"seed=[{','.join(map(str, args.seeds))}]", "progress=false", *args.overrides]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        last = json.loads((out / f"seed{args.seeds[0]}" / "results.json").read_text())
        cost = last["cost"][-1]
        rows.append((method, summary, cost))
    print(f"\n{args.config_name}, seeds {args.seeds}")
    print("| method | avg acc | last acc | forgetting | GFLOPs/image | params (M) | exemplars |")
    print("|---|---|---|---|---|---|---|")
    for method, s, c in rows:
        f = s.get("forgetting")
        ftxt = f"{f['mean']:.2f} ± {f['std']:.2f}" if f else "-"
        print(f"| {method} | {s['avg_acc']['mean']:.2f} ± {s['avg_acc']['std']:.2f} | "
              f"{s['last_acc']['mean']:.2f} ± {s['last_acc']['std']:.2f} | {ftxt} | {c['inference_gflops']:.3f} | "
              f"{c['params_total'] / 1e6:.2f} | {c['memory_exemplars']} |")
    if args.plot:
        plot_curves(args, [m for m, _, _ in rows], Path(args.plot))
    for method, s, _ in rows:  # extra classifiers (iCaRL's NME), averaged over the seeds' results.json
        runs = seed_results(args, method)
        for name in (runs[0].get("extra") or {}):
            avg = [r["extra"][name]["avg_acc"] for r in runs]
            last = [r["extra"][name]["last_acc"] for r in runs]
            print(f"{method} {name}: avg acc {statistics.mean(avg):.2f} ± {statistics.pstdev(avg):.2f}, "
                  f"last acc {statistics.mean(last):.2f} ± {statistics.pstdev(last):.2f}")


def seed_results(args, method) -> list:
    """results.json of each seed's run of `method`."""
    return [json.loads((Path(args.out) / method / f"seed{seed}" / "results.json").read_text()) for seed in args.seeds]


def plot_curves(args, methods, path: Path) -> None:
    """Accuracy on all seen classes after each task, one line per method, shaded ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dynammo.report import _save_fig

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, method in enumerate(methods):
        acc = np.array([r["acc"] for r in seed_results(args, method)])
        tasks = np.arange(1, acc.shape[1] + 1)
        mean, std = acc.mean(0), acc.std(0)
        colour = plt.cm.tab20(i % 20)  # distinct colours for up to 20 methods
        ax.plot(tasks, mean, "o-" if i % 2 == 0 else "s--", ms=3, color=colour, label=method)
        ax.fill_between(tasks, mean - std, mean + std, color=colour, alpha=0.08)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_xticks(tasks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{args.config_name}, seeds {', '.join(map(str, args.seeds))}", fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
