"""`python main.py --config X.yaml --device N`: the reference framework's command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from dynammo.config_yaml import read_yaml
from dynammo.configure import build_config
from dynammo.errors import UserError

SECTIONS = ("basic", "usual", "special")


def flatten_reference_config(raw: dict) -> dict:
    """Merge the reference's sections into one flat mapping; `options[dataset][backbone]` (or
    `options[dataset]`) holds the per-setting training keys."""
    flat = {k: v for k, v in raw.items() if k not in SECTIONS + ("options",)}
    for section in SECTIONS:
        part = raw.get(section) or {}
        if not isinstance(part, dict):
            raise UserError(f"section '{section}' of the config must be a mapping")
        flat.update(part)
    options = raw.get("options")
    if isinstance(options, dict):
        ds = flat.get("dataset")
        bb = flat.get("backbone", flat.get("convnet_type"))
        per_ds = options.get(ds) if isinstance(ds, str) else None
        if isinstance(per_ds, dict):
            chosen = per_ds.get(bb) if isinstance(per_ds.get(bb), dict) else per_ds
            flat.update({k: v for k, v in chosen.items() if not isinstance(v, dict)})
    return flat


def reference_device(value: str) -> str:
    """'0' or '0,1' -> cuda:0 (the first GPU); '-1' or 'cpu' -> cpu."""
    value = str(value).strip()
    if value in ("-1", "cpu", ""):
        return "cpu"
    first = value.split(",")[0].strip()
    return f"cuda:{first}" if first.isdigit() else first


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description="dynammo with the reference framework's command line")
    parser.add_argument("--config", help="YAML options file (to train)")
    parser.add_argument("--device", help="GPU index as in the reference ('0'), or cpu")
    parser.add_argument("--out", help="run directory")
    parser.add_argument("--checkpoint_dir", help="evaluate the last checkpoint of this run directory (or of its "
                                                 "checkpoints/ folder) instead of training")
    args = parser.parse_args(argv)
    if not args.config and not args.checkpoint_dir:
        parser.error("give --config to train or --checkpoint_dir to evaluate")
    try:
        if args.checkpoint_dir:
            return evaluate_dir(Path(args.checkpoint_dir), args.device)
        from dynammo.cli import start_run

        raw = flatten_reference_config(read_yaml(args.config))
        if args.device is not None:
            raw["device"] = reference_device(args.device)
        notices: list = []
        return start_run(build_config(raw, notices), notices, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def evaluate_dir(path: Path, device: Optional[str]) -> int:
    from dynammo.cli import print_evaluation
    from dynammo.console import Console
    from dynammo.run.evaluation import evaluate_checkpoint

    run_dir = path.parent if path.name == "checkpoints" and not (path / "config.yaml").exists() else path
    res = evaluate_checkpoint(run_dir, None, Console(progress="false", quiet=True),
                              reference_device(device) if device is not None else None)
    print_evaluation(res, as_json=False)
    return 0
