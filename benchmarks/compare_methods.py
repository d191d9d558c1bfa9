"""Run several methods under ONE protocol (same data, split, class order, backbone, memory, budget,
seeds) and print the protocol's tables of `dynammo report`: a thin call of `dynammo sweep`
(src/dynammo/sweep/, docs/sweep.md), which this script now is, plus an optional accuracy plot.

    python benchmarks/compare_methods.py --protocol mednist_cpu \\
        --methods joint finetune replay icarl gem ucir bic podnet wa der_pp der acl dynammo \\
        --out runs/compare_mednist_cpu --plot docs/img/compare_mednist_cpu.png data_root=../shared/data

is the same as

    dynammo sweep -c mednist_cpu --methods joint finetune ... --out runs/compare_mednist_cpu data_root=../shared/data

Each run is `dynammo run -c PROTOCOL -c METHOD --out OUT/<method>/seed<S> seed=S ...`: the protocol's
keys come from the protocol file alone; a method file that sets a protocol key is refused; a
key=value override goes to every method that knows it (a method's key only to the methods that
declare it). Runs already complete are not run again, interrupted ones are resumed. Then the script
checks that every run recorded the same protocol hash (else the runs are not comparable: exit 2)
and, with --plot, draws each method's accuracy after every task (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynammo.cli import main as dynammo_main
from dynammo.io import write_bytes_atomic
from dynammo.methods import METHODS
from dynammo.protocols import protocol_names
from dynammo.reporting import build_sections, discover
from dynammo.reporting.figures import accuracy_figure


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def sweep_argv(args) -> list:
    """The `dynammo sweep` command line of this comparison."""
    argv = ["sweep", "-c", args.protocol, "--methods", *args.methods, "--out", args.out, "--jobs", str(args.jobs)]
    if args.seeds:
        argv += ["--seeds", *map(str, args.seeds)]
    return argv + list(args.overrides)


def compared_runs(args) -> list:
    """The finished runs of this comparison: OUT/<method>/seed<S>/ of the methods (and seeds) given."""
    folders = {Path(args.out) / METHODS.canonical(m) for m in args.methods}
    return [run for run in discover([args.out]).runs
            if run.dir.parent in folders and (not args.seeds or run.seed in args.seeds)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", required=True, help=f"a shipped protocol: {', '.join(protocol_names())}")
    ap.add_argument("--methods", nargs="+", default=["joint", "finetune", "replay"])
    ap.add_argument("--seeds", nargs="+", type=int, help="default: the protocol's seeds")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (dynammo sweep --jobs)")
    ap.add_argument("--plot", help="also write a PNG of each method's accuracy after every task (mean ± std over seeds)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (dynammo sweep's rules)")
    args = ap.parse_args()
    if args.protocol not in protocol_names():
        fail(f"unknown protocol {args.protocol}; shipped: {', '.join(protocol_names())}")
    code = dynammo_main(sweep_argv(args))
    if code != 0:
        raise SystemExit(code)
    sections = build_sections(compared_runs(args))
    if len(sections) != 1:
        fail(f"the runs recorded different protocol hashes {sorted(s.hash for s in sections)}: they are not comparable")
    if args.plot:
        seeds = sorted({str(r.seed) for r in sections[0].runs})
        title = f"protocol {args.protocol}, seeds {', '.join(seeds)} (± sample std)"
        write_bytes_atomic(Path(args.plot), accuracy_figure(sections[0], title).png)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
