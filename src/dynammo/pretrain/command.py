"""`dynammo pretrain`: a new pretraining run, or `--resume RUN_DIR` of an interrupted one."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from dynammo.config_yaml import read_yaml
from dynammo.console import Console
from dynammo.errors import UserError
from dynammo.io import read_json
from dynammo.pretrain.config import build_pretrain_config, load_pretrain_config
from dynammo.pretrain.run import BACKBONE_FILE, PARTIAL, SUMMARY, Pretraining
from dynammo.rundir import check_run_dir


def default_out(cfg) -> Path:
    data = Path(cfg.ssl_folder).name if cfg.ssl_folder else cfg.dataset
    return Path("runs") / f"pretrain_{cfg.ssl_method}_{data}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def pretrain(cfg, out: Optional[Path], console: Console, device: Optional[str] = None, notices=()) -> dict:
    """A new pretraining run; the config's notices are printed once everything it needs is built."""
    out = Path(out) if out is not None else default_out(cfg)
    check_run_dir(out)
    if (out / SUMMARY).exists():
        raise UserError(f"run directory {out} already holds a pretraining; choose another --out or remove it")
    run = Pretraining(cfg, console, device)
    for line in notices:
        console.print(line)
    return run.run(out)


def read_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not (run_dir / SUMMARY).is_file() or not path.is_file():
        raise UserError(f"{run_dir} is not the run directory of a `dynammo pretrain` (no {SUMMARY} or config.yaml); "
                        "give its --out folder")
    return build_pretrain_config(read_yaml(path))  # one line for damaged, hostile or non-UTF-8 YAML


def resume_pretrain(run_dir, console: Console, device: Optional[str] = None) -> dict:
    """Continue an interrupted pretraining from its partial checkpoint (or from the start when none
    was written); the result equals an uninterrupted run's."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    summary = read_json(run_dir / SUMMARY, SUMMARY, "restore it, or if the pretraining did not finish, write {} into "
                        "it to resume from the partial checkpoint")
    if isinstance(summary, dict) and summary.get("status") == "complete":
        raise UserError(f"the pretraining in {run_dir} is complete; nothing to resume (its backbone: "
                        f"{run_dir / BACKBONE_FILE})")
    run = Pretraining(cfg, console, device)
    partial = None
    path = run_dir / "checkpoints" / PARTIAL
    if path.is_file():
        try:
            partial = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint {path} is damaged ({exc.__class__.__name__}); delete it to start the "
                            "pretraining again") from None
        mine = {"kind": "pretrain_partial", "ssl_method": cfg.ssl_method, "backbone": cfg.backbone,
                "images": len(run.data.images)}
        theirs = {k: partial.get(k) for k in mine} if isinstance(partial, dict) else {}
        if theirs != mine:
            raise UserError(f"checkpoint {path} belongs to another pretraining ({theirs} vs {mine}); delete it to "
                            "start again")
    console.attach(run_dir / "log.txt")
    console.print(f"resuming {run_dir}" + (" from its partial checkpoint" if partial else " from the start"))
    console.detach()
    return run.run(run_dir, partial, resume=True)


def pretrain_command(args) -> int:
    """`dynammo pretrain [-c CONFIG] [--out DIR] [--device D] [key=value ...]` and `--resume RUN_DIR`."""
    overrides = list(args.overrides)
    if args.resume:
        if args.config or overrides or args.out:
            raise UserError("--resume RUN_DIR continues a run with its own config.yaml; give no -c, --out or key=value")
        resume_pretrain(args.resume, Console(progress="auto"), args.device)
        return 0
    if args.device:
        overrides.append(f"device={args.device}")
    notices: list = []
    cfg = load_pretrain_config(args.config, overrides, notices)
    pretrain(cfg, Path(args.out) if args.out else None, Console(progress=cfg.progress), notices=notices)
    return 0
