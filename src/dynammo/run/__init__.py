"""One continual run, from config to run directory (whose files, with their one writer and reader
and the rule for "complete", are dynammo/rundir.py, below this package and `dynammo report`):
- build: the run's parts (data, scenario, engine, method) and the distributed world it joins
- experiment: a seed list (one run per seed, summary.json)
- single: a new run and the resume of an interrupted one
- session: the lifecycle every run shares (log.txt, signals, journal, final status)
- loop: the task loop, handing each task's record to the sinks (sinks/)
- evaluation: the test of the seen classes after each task, and of a checkpoint
"""
from __future__ import annotations

from typing import List


def seeds_of(cfg) -> List[int]:
    """The config's seeds (`dynammo run`, `sweep`, `pretrain`): `seed` is one seed or a list of them."""
    return list(cfg.seed) if isinstance(cfg.seed, list) else [cfg.seed]
