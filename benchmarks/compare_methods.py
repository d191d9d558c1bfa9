"""Run several methods under ONE protocol (same data, split, class order, backbone, memory, budget,
seeds) through the real CLI and print a markdown table: mean ± sample std (ddof=1) over seeds of
average and last accuracy (or MCR, the protocol's headline), forgetting, the cost after the last
task, the training budget each method used, and every deviation from its paper.

    python benchmarks/compare_methods.py --protocol mednist_cpu \\
        --methods joint finetune replay icarl gem ucir bic podnet wa der_pp der acl dynammo \\
        --out runs/compare_mednist_cpu --plot docs/img/compare_mednist_cpu.png data_root=../shared/data

Each method runs as `dynammo run -c PROTOCOL -c METHOD ...`: the protocol's keys come from the
protocol file alone. A method file that sets a protocol key is refused, key=value overrides apply
to every method alike, and the script checks that every run recorded the same protocol hash.
Methods already run (their summary.json exists) are not run again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from dynammo.config import parse_overrides, read_yaml
from dynammo.methods import METHODS
from dynammo.protocols import PROTOCOL_KEYS, protocol_names, read_protocol, shipped_method_file


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_method_files(protocol: str, methods) -> None:
    """No method file may set what the protocol fixes: the comparison would not be fair."""
    for method in methods:
        path = shipped_method_file(METHODS.canonical(method), protocol)
        if path is None:
            continue
        clash = sorted(set(read_yaml(path)) & set(PROTOCOL_KEYS))
        if clash:
            fail(f"{path} sets protocol key(s) {', '.join(clash)}; a method file may not change protocol {protocol}")


def mean_std(vals) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def budget_text(results: dict) -> str:
    """The training budget of a run: epochs per stage of the first and of later tasks, images seen."""
    def stages(task):
        return " + ".join(f"{s['stage']} {s['epochs']}" for s in task)

    budget = results.get("budget") or []
    parts = [stages(budget[0])] if budget else []
    later = {stages(t) for t in budget[1:]}
    if later and later != set(parts):
        parts.append("later: " + " / ".join(sorted(later)))
    images = sum(c.get("train_images", 0) for c in results["cost"])
    return f"{'; '.join(parts)} ep ({images / 1000:.1f}k images)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", required=True, help=f"a shipped protocol: {', '.join(protocol_names())}")
    ap.add_argument("--methods", nargs="+", default=["joint", "finetune", "replay"])
    ap.add_argument("--seeds", nargs="+", type=int, help="default: the protocol's seeds")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--plot", help="also write a PNG of each method's accuracy after every task (mean ± std over seeds)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every run alike")
    args = ap.parse_args()
    if args.protocol not in protocol_names():
        fail(f"unknown protocol {args.protocol}; shipped: {', '.join(protocol_names())}")
    protocol = read_protocol(args.protocol)
    seeds = args.seeds or (protocol["seed"] if isinstance(protocol["seed"], list) else [protocol["seed"]])
    args.seeds = seeds
    check_method_files(args.protocol, args.methods)
    changed = sorted(k for k in parse_overrides(args.overrides) if k in PROTOCOL_KEYS and k != "seed")
    rows = []
    for method in args.methods:
        out = Path(args.out) / method
        if not (out / "summary.json").exists():
            cmd = [sys.executable, "-m", "dynammo", "run", "-c", args.protocol, "-c", method, "--out", str(out),
                   f"seed=[{','.join(map(str, seeds))}]", "progress=false", *args.overrides]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows.append((method, json.loads((out / "summary.json").read_text()), seed_results(args, method)))
    hashes = {runs[0]["protocol"]["hash"] for _, _, runs in rows}
    if len(hashes) != 1:
        fail(f"the runs recorded different protocol hashes {sorted(hashes)}: they are not comparable")
    print_table(args, rows, protocol.get("metric", "acc"), changed, hashes.pop())
    if args.plot:
        plot_curves(args, [m for m, _, _ in rows], Path(args.plot))


def print_table(args, rows, metric: str, changed, phash: str) -> None:
    over = f", overridden: {', '.join(changed)}" if changed else ""
    print(f"\nprotocol {args.protocol} #{phash}{over}; seeds {args.seeds}; mean ± sample std (ddof=1); "
          f"headline {metric}")
    m = "acc" if metric == "acc" else "mcr"
    print(f"| method | avg {m} | last {m} | forgetting | GFLOPs/image | params (M) | exemplars | budget | deviations |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes: list = []

    def note_refs(devs) -> str:
        refs = []
        for d in devs:
            if d not in notes:
                notes.append(d)
            refs.append(str(notes.index(d) + 1))
        return ", ".join(refs) or "-"

    for method, summary, runs in rows:
        first = runs[0]
        cost = first["cost"][-1]
        blocks = [(first.get("label", method), runs)]
        blocks += [(f"{first.get('label', method)}, {name} classifier (extra)", [r["extra"][name] for r in runs])
                   for name in sorted(first.get("extra") or {})]
        for label, res in blocks:
            print(f"| {label} | {mean_std([r[f'avg_{m}'] for r in res])} | {mean_std([r[f'last_{m}'] for r in res])} | "
                  f"{mean_std([r['forgetting'] for r in res if r.get('forgetting') is not None])} | "
                  f"{cost['inference_gflops']:.3f} | {cost['params_total'] / 1e6:.2f} | {cost['memory_exemplars']} | "
                  f"{budget_text(first)} | {note_refs(first.get('deviations') or [])} |")
    for i, d in enumerate(notes, 1):
        print(f"\n{i}. {d}", end="")
    print()


def seed_results(args, method) -> list:
    """results.json of each seed's run of `method`."""
    return [json.loads((Path(args.out) / method / f"seed{seed}" / "results.json").read_text()) for seed in args.seeds]


def plot_curves(args, methods, path: Path) -> None:
    """Accuracy on all seen classes after each task, one line per method, shaded ± sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dynammo.report import _save_fig

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, method in enumerate(methods):
        runs = seed_results(args, method)
        acc = np.array([r["acc"] for r in runs])
        tasks = np.arange(1, acc.shape[1] + 1)
        mean, std = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(acc.shape[1])
        colour = plt.cm.tab20(i % 20)  # distinct colours for up to 20 methods
        ax.plot(tasks, mean, "o-" if i % 2 == 0 else "s--", ms=3, color=colour, label=runs[0].get("label", method))
        ax.fill_between(tasks, mean - std, mean + std, color=colour, alpha=0.08)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_xticks(tasks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"protocol {args.protocol}, seeds {', '.join(map(str, args.seeds))} (± sample std)", fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
