"""The `dynammo` command: run, list (eval, resume, cost, export, predict come with their issues)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from dynammo.errors import UserError


def _cmd_run(args) -> int:
    from dynammo.config import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    notices: list = []
    cfg = load_config(args.config, overrides, notices=notices)
    return start_run(cfg, notices, args.out)


def start_run(cfg, notices, out) -> int:
    """Show the config notices, then run every seed (shared by `dynammo run` and main.py)."""
    from dynammo.console import Console
    from dynammo.runner import run_experiment

    console = Console(progress=cfg.progress)
    for n in notices:
        console.print(n)
    run_experiment(cfg, Path(out) if out else None, console)
    return 0


def _cmd_list(args) -> int:
    from dynammo.config import OPTIONS
    from dynammo.data.datasets import DATASETS
    from dynammo.methods import METHODS
    from dynammo.models.backbones import BACKBONES

    if args.keys:
        print("config keys (type, default):")
        for key, opt in OPTIONS.items():
            print(f"  {key:<20} {opt.kind:<12} {opt.default!r:<12} {opt.help}")
        for name in METHODS.names():
            opts = METHODS.get(name).options
            if opts:
                print(f"keys of method {name}:")
                for key, opt in opts.items():
                    print(f"  {key:<20} {opt.kind:<12} {opt.default!r:<12} {opt.help}")
        return 0
    print("methods:")
    for name in METHODS.names():
        cls = METHODS.get(name)
        aliases = METHODS.aliases_of(name)
        alias_txt = f" (also: {', '.join(aliases)})" if aliases else ""
        print(f"  {name:<12} {cls.summary}{alias_txt}")
    medmnist = [n for n in DATASETS.names() if "mnist" in n]
    print("datasets:")
    for name in DATASETS.names():
        if name not in medmnist:
            print(f"  {name}")
    print(f"  MedMNIST: {', '.join(n for n in medmnist if '_' not in n)} (add _64, _128 or _224 for larger sizes)")
    print("backbones:")
    print("  " + ", ".join(BACKBONES.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynammo", description="Class-incremental learning for medical imaging.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train a method task after task and write a run directory")
    run.add_argument("-c", "--config", help="YAML config (default: the embedded DynaMMo-on-digits default)")
    run.add_argument("--out", help="run directory (default: runs/<method>_<dataset>_<time>)")
    run.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: auto)")
    run.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    run.set_defaults(func=_cmd_run)
    lst = sub.add_parser("list", help="show methods, datasets and backbones")
    lst.add_argument("--keys", action="store_true", help="list every config key with its type and default")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
