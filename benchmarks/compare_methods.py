"""Run several methods under ONE protocol (same data, split, class order, backbone, memory, budget,
seeds) through the real CLI and print the protocol's tables of `dynammo report` (dynammo.reporting):
mean ± sample std (ddof=1) over seeds of average and last accuracy and MCR, forgetting, BWT,
task-IL accuracy, the cost after the last task, the training budget each method used, and every
deviation from its paper. `dynammo report OUT` makes the figures, LaTeX and HTML of the same runs.

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
import subprocess
import sys
from pathlib import Path

from dynammo.config import parse_overrides, read_yaml
from dynammo.io import write_bytes_atomic
from dynammo.methods import METHODS
from dynammo.protocols import PROTOCOL_KEYS, protocol_names, read_protocol, shipped_method_file
from dynammo.reporting import build_sections, markdown_section, read_run
from dynammo.reporting.figures import accuracy_figure


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


def method_runs(out: Path, seeds) -> list:
    """The finished runs of one method: out/ itself for one seed, out/seed<N>/ for a seed list."""
    dirs = [out] if len(seeds) == 1 else [out / f"seed{seed}" for seed in seeds]
    runs = []
    for d in dirs:
        run, problem = read_run(d) if (d / "results.json").is_file() else (None, f"{d}: no results.json")
        if problem or not run.usable:
            fail(problem or f"{d}: the run is {run.state_text()}")
        runs.append(run)
    return runs


def already_run(out: Path, seeds) -> bool:
    if len(seeds) > 1:
        return (out / "summary.json").exists()
    run, _ = read_run(out) if (out / "results.json").is_file() else (None, None)
    return run is not None and run.usable


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
    runs = []
    for method in args.methods:
        out = Path(args.out) / method
        if not already_run(out, seeds):
            cmd = [sys.executable, "-m", "dynammo", "run", "-c", args.protocol, "-c", method, "--out", str(out),
                   f"seed=[{','.join(map(str, seeds))}]", "progress=false", *args.overrides]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        runs += method_runs(out, seeds)
    sections = build_sections(runs)
    if len(sections) != 1:
        fail(f"the runs recorded different protocol hashes {sorted(s.hash for s in sections)}: they are not comparable")
    print_table(args, sections[0], changed)
    if args.plot:
        title = f"protocol {args.protocol}, seeds {', '.join(map(str, seeds))} (± sample std)"
        write_bytes_atomic(Path(args.plot), accuracy_figure(sections[0], title).png)
        print(f"plot: {args.plot}")
    print(f"tables, figures and an HTML page of these runs: dynammo report {args.out} --out REPORT_DIR")


def print_table(args, section, changed) -> None:
    """The protocol's section of `dynammo report` (the same tables, from dynammo.reporting)."""
    over = f", overridden: {', '.join(changed)}" if changed else ""
    print(f"\nprotocol {args.protocol} #{section.hash}{over}; seeds {args.seeds}\n")
    print(markdown_section(section, level=3))


if __name__ == "__main__":
    main()
