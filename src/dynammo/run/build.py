"""The parts of a run, built before anything is written, and the distributed world it joins."""
from __future__ import annotations

from dynammo.assembly import build_run
from dynammo.config import Config
from dynammo.console import Console, MutedConsole
from dynammo.distributed import init_world
from dynammo.methods import METHODS


def prepare(cfg: Config, console: Console):
    """Everything that can fail on bad input, before anything is written: data, scenario, engine,
    method. Returns (data, scenario, engine, method)."""
    return tuple(build_run(cfg, console))


def join_world(cfg: Config, console: Console):
    """Under torchrun: join the process group, put this rank on its device, and let only rank 0
    print. A method that cannot train distributed is refused here, before anything is written."""
    world, device = init_world(cfg.device)
    if not world.distributed:
        return cfg, console
    METHODS.get(cfg.method).check_distributed(cfg)
    cfg = cfg.copy()
    cfg["device"] = device
    return cfg, (console if world.main else MutedConsole())
