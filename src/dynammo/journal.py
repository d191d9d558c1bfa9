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
    set by the runner; the journal adds the trained parameters and the RNG states.
    """

    def __init__(self, capture: Callable[[], dict], restore: Callable[[dict], None]):
        self.capture, self.restore = capture, restore
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

    def snapshot(self, params: List[torch.nn.Parameter], generator: torch.Generator) -> dict:
        return {"params": [p.detach().cpu().clone() for p in params], "method": self.capture(),
                "rng": rng_state(generator)}

    def apply(self, snap: dict, params: List[torch.nn.Parameter], generator: torch.Generator) -> None:
        if len(snap["params"]) != len(params) or any(a.shape != p.shape for a, p in zip(snap["params"], params)):
            raise UserError("the partial checkpoint does not match what this version of the method trains; delete "
                            "checkpoints/partial.pt to restart the interrupted task from its start")
        with torch.no_grad():
            for p, saved in zip(params, snap["params"]):
                p.copy_(saved.to(p.device))
        self.restore(snap["method"])
        set_rng_state(snap["rng"], generator)

    def state(self, current: Optional[dict]) -> dict:
        return {"finished": self.finished, "current": current}
