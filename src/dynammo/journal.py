"""Exact resumption inside a task: random-number states, and the journal of a task's `Engine.fit`
calls.

A task is a sequence of method code and `fit` calls (one per stage). Resuming in the middle of a
task replays that same code from the task-start checkpoint; the journal makes each `fit` call that
had already finished restore its end state (its parameters, the network's buffers, the method's
memory/extra state, every RNG) instead of training again, and the `fit` call that was interrupted
continue from its saved epoch and batch with its optimiser, schedule and data order. Because the
code between `fit` calls runs again from identical states, the resumed run ends bit-for-bit where
an uninterrupted one would (on CPU).
"""
from __future__ import annotations

import random
from typing import Callable, List, Optional

import numpy as np
import torch

from dynammo.distributed import World
from dynammo.errors import UserError


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG a run draws from, as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(), "engine": generator.get_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["engine"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class FitJournal:
    """The `fit` calls of the current task: finished ones (end states) and the running one.

    `capture()`/`restore(state)` are the method-level parts (network buffers, memory, extra state),
    set by the runner; the journal adds the trained parameters and the RNG states. `save(state)`
    writes a partial checkpoint (rank 0 of a distributed run; the others only take part in the
    gathering of their own states).
    """

    def __init__(self, capture: Callable[[], dict], restore: Callable[[dict], None],
                 save: Optional[Callable[[dict], None]] = None, world: Optional[World] = None):
        self.capture, self.restore, self.save = capture, restore, save
        self.world = world or World()
        self.finished: List[dict] = []
        self.replay: List[dict] = []  # finished entries of an interrupted run, to restore instead of training
        self.resume_current: Optional[dict] = None  # the interrupted fit's state
        self.index = 0  # position of the next fit call in the task

    def start_task(self) -> None:
        self.finished, self.index = [], 0

    def end_task(self) -> None:
        """The replayed task is over: later tasks train normally."""
        self.finished, self.replay, self.resume_current = [], [], None

    def load(self, saved: dict) -> None:
        """Replay the journal of an interrupted task (from a partial checkpoint)."""
        self.replay = list(saved["finished"])
        self.resume_current = saved.get("current")

    def fit_call(self, params: List[torch.nn.Parameter], generator: torch.Generator) -> "FitCall":
        """The next `fit` call of the task; when it had finished before the interruption, its end
        state is restored and `call.finished` holds its entry."""
        call = FitCall(self, self.index, params, generator)
        self.index += 1
        if call.index < len(self.replay):
            entry = self.replay[call.index]
            self.apply(entry["end"], params, generator)
            self.finished.append(entry)
            call.finished = entry
        return call

    def snapshot(self, params: List[torch.nn.Parameter], generator: torch.Generator) -> dict:
        """Parameters (equal on every rank) and, per rank, the method-level state and RNGs (kept per
        rank so a resume restores each process exactly as it was)."""
        own = {"method": self.capture(), "rng": rng_state(generator)}
        snap = {"params": [p.detach().cpu().clone() for p in params]}
        if self.world.distributed:
            return {**snap, "ranks": self.world.gather(own)}
        return {**snap, **own}

    def apply(self, snap: dict, params: List[torch.nn.Parameter], generator: torch.Generator) -> None:
        if len(snap["params"]) != len(params) or any(a.shape != p.shape for a, p in zip(snap["params"], params)):
            raise UserError("the partial checkpoint does not match what this version of the method trains; delete "
                            "checkpoints/partial.pt to restart the interrupted task from its start")
        own = snap
        if "ranks" in snap:
            if len(snap["ranks"]) != self.world.size:
                raise UserError(f"the partial checkpoint was written by {len(snap['ranks'])} processes, this run has "
                                f"{self.world.size}; resume it with --nproc-per-node={len(snap['ranks'])} or delete "
                                "checkpoints/partial.pt to restart the interrupted task from its start")
            own = snap["ranks"][self.world.rank]
        elif self.world.distributed:
            raise UserError("the partial checkpoint was written by one process; resume it without torchrun or delete "
                            "checkpoints/partial.pt to restart the interrupted task from its start")
        with torch.no_grad():
            for p, saved in zip(params, snap["params"]):
                p.copy_(saved.to(p.device))
        self.restore(own["method"])
        set_rng_state(own["rng"], generator)

    def state(self, current: Optional[dict]) -> dict:
        return {"finished": self.finished, "current": current}


class FitCall:
    """One `fit` call's place in the task's journal: restore it when it had finished, continue it
    when it was interrupted, save partial points, record its end."""

    def __init__(self, journal: FitJournal, index: int, params: List[torch.nn.Parameter],
                 generator: torch.Generator):
        self.journal, self.index, self.params, self.generator = journal, index, params, generator
        self.finished: Optional[dict] = None

    def resume(self, opt, sched, scaler) -> Optional[dict]:
        """The saved point of this call when it is the interrupted one, with the parameters,
        optimiser, schedule, scaler and RNGs restored to it; else None."""
        journal = self.journal
        point = journal.resume_current
        if point is None or point["index"] != self.index:
            return None
        journal.resume_current = None
        journal.apply(point["snap"], self.params, self.generator)
        opt.load_state_dict(point["optimizer"])
        if sched is not None:
            sched.load_state_dict(point["scheduler"])
        if scaler is not None and point.get("scaler"):
            scaler.load_state_dict(point["scaler"])
        return point

    def save(self, epoch: int, batch: int, order, sums, opt, sched, scaler, stats: dict) -> None:
        """A partial checkpoint: this call at (epoch, batch), the task's finished calls before it."""
        journal = self.journal
        if journal.save is None:
            return
        current = {"index": self.index, "epoch": epoch, "batch": batch, "order": order, "sums": sums,
                   "snap": journal.snapshot(self.params, self.generator), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict() if sched is not None else None,
                   "scaler": scaler.state_dict() if scaler is not None else None, "stats": stats}
        if journal.world.main:
            journal.save(journal.state(current))
        journal.world.barrier()

    def finish(self, stats: dict, optimizer_state: dict) -> None:
        self.journal.finished.append({"end": self.journal.snapshot(self.params, self.generator), "stats": stats,
                                      "optimizer": optimizer_state})
