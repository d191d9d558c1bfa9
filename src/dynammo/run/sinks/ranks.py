"""A distributed run's ranks must hold bitwise the same model, memory and RNGs after every task."""
from __future__ import annotations

from dynammo.console import Console
from dynammo.distributed import state_digest
from dynammo.journal import rng_state
from dynammo.run.sinks import Sink, TaskRecord


class RankDigests(Sink):
    """results.json `rank_digests` keeps every rank's digest per task, and a difference is said. Every
    rank takes part (a gather); it comes before the run directory's sink, which saves what it adds."""

    def __init__(self, method, engine, console: Console):
        self.method, self.engine, self.console = method, engine, console

    def task_done(self, record: TaskRecord) -> None:
        engine = self.engine
        digests = engine.world.gather(state_digest({"state": self.method.state_dict(),
                                                    "rng": rng_state(engine.generator)}))
        record.results.setdefault("rank_digests", []).append(digests)
        if len(set(digests)) > 1:
            self.console.print(f"warning: the {len(digests)} processes hold different states after {record.label}; "
                               "please report this with the run's config.yaml")
