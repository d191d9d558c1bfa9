"""The method API. A method says only what differs; the runner and the engine do the rest.

Lifecycle, per task: `begin_task` (grow heads) -> `train_task` (one or more `engine.fit` stages)
-> `end_task` (update memory). At evaluation the runner calls `predict` on batches of test images.

Structure: every module a task adds is created by `grow(task)` (by default `begin_task`), which must
build exactly what training builds, without data. `load_state_dict` replays `grow` for each task a
checkpoint holds and then loads the weights, so `dynammo cost`, `export`, `eval` and `resume` work for
every method; anything else a method keeps between tasks (tensors, numbers) goes into `extra_state`.

- A single-stage method overrides `step` (the loss of one batch) and maybe `training_set`.
- A multi-stage method overrides `train_task` and calls `self.engine.fit(params, data, loss, settings)`
  once per stage.
- GEM-like methods pass `before_step` to `fit` (runs between backward and the optimiser step).
- `predict` returns {"logits": (B, n_seen)} (class-IL argmax, task-IL argmax within the task's
  classes); a method with its own decision rule may add "pred" (B,) and "task_il_logits".
Device, AMP, progress bars, metrics, checkpoints and cost accounting come from the framework.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.config import Option
from dynammo.data.imageset import ImageSet
from dynammo.data.memory import ExemplarMemory
from dynammo.data.scenario import Scenario, Task
from dynammo.engine import Batch, Engine, OptimSettings
from dynammo.errors import UserError
from dynammo.models.backbones import build_backbone
from dynammo.models.network import IncrementalNet


class Method:
    options: Dict[str, Option] = {}  # method-specific config keys
    uses_memory = False
    summary = ""

    def __init__(self, cfg, engine: Engine, scenario: Scenario):
        self.cfg = cfg
        self.engine = engine
        self.scenario = scenario
        self.device = engine.device
        self.net = self.build_network()
        self.memory: Optional[ExemplarMemory] = ExemplarMemory.from_config(cfg) if self.uses_memory else None
        self.known = 0  # classes learned before the current task
        self.total = 0  # classes learned including the current task
        self.tasks_done = 0  # tasks whose structure exists (grown or trained)

    # ---- configuration checks, before anything is written ----
    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        if cls.uses_memory:
            if not cfg.memory_per_class and cfg.memory_size <= 0:
                raise UserError(f"method '{cfg.method}' needs an exemplar memory; set memory_size=N (e.g. 2000) or memory_per_class=N")
            ExemplarMemory.from_config(cfg).check_budget(num_classes)

    # ---- model ----
    def build_network(self) -> nn.Module:
        return IncrementalNet(build_backbone(self.cfg.backbone, self.cfg.pretrained))

    def train_mode(self) -> None:
        self.net.train()

    def eval_mode(self) -> None:
        self.net.eval()

    # ---- lifecycle ----
    def begin_task(self, task: Task) -> None:
        self.known, self.total = task.start, task.end
        self.tasks_done = task.id + 1
        self.net.head.expand(task.size)
        self.net.to(self.device)

    def training_set(self, task: Task) -> ImageSet:
        return self.scenario.train_data(task)

    def train_task(self, task: Task) -> None:
        self.train_mode()
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        self.engine.fit(self.net.parameters(), self.training_set(task), self.step, settings)

    def step(self, batch: Batch):
        logits = self.net(batch.x)
        return F.cross_entropy(logits, batch.y), logits, batch.y

    def end_task(self, task: Task) -> None:
        if self.memory is not None:
            self.eval_mode()
            self.memory.update(self.scenario.train_data(task), task.classes, task.end, self.features,
                               self.engine.generator)

    # ---- inference ----
    def predict(self, x: torch.Tensor) -> dict:
        return {"logits": self.net(x)}

    def features(self, data: ImageSet) -> torch.Tensor:
        """Features used for exemplar selection (eval mode, test transform)."""
        return self.engine.apply(self.net.features, data)

    # ---- accounting and checkpoints ----
    def memory_budget(self, n_seen: int) -> int:
        """Exemplars the memory may hold once n_seen classes are learned (for `dynammo cost`)."""
        if self.memory is None:
            return 0
        return self.memory.quota(n_seen) * n_seen

    def memory_stats(self) -> tuple:
        if self.memory is None:
            return 0, 0
        return len(self.memory), self.memory.nbytes

    # ---- structure without training (cost accounting, checkpoints, export) ----
    def grow(self, task: Task) -> None:
        """Build task's modules exactly as training would, without data (default: `begin_task`)."""
        self.begin_task(task)

    def extra_state(self) -> dict:
        """What a method keeps between tasks beside `net` and the memory (tensors, numbers, lists)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "known": self.known, "total": self.total,
                "tasks_done": self.tasks_done, "extra": self.extra_state(),
                "memory": self.memory.state_dict() if self.memory is not None else None}

    # ---- inside a task (exact resumption, see journal.py) ----
    def capture_training_state(self) -> dict:
        """What training changes besides the trained parameters: the network's buffers (BatchNorm
        statistics), the memory (DER++ fills it while training) and the extra state."""
        return {"buffers": {k: v.detach().cpu().clone() for k, v in self.net.named_buffers()},
                "extra": copy.deepcopy(self.extra_state()),
                "memory": self.memory.state_dict() if self.memory is not None else None}

    def restore_training_state(self, state: dict) -> None:
        buffers = dict(self.net.named_buffers())
        if set(buffers) != set(state["buffers"]):
            raise UserError("the partial checkpoint does not match the network this version of the method builds; "
                            "delete checkpoints/partial.pt to restart the interrupted task from its start")
        with torch.no_grad():
            for name, value in state["buffers"].items():
                buffers[name].copy_(value.to(buffers[name].device))
        self.load_extra_state(copy.deepcopy(state["extra"]))
        if state["memory"] is not None and self.memory is not None:
            self.memory.load_state_dict(state["memory"])

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the structure of a checkpoint (one `grow` per trained task), then load it."""
        for task in self.scenario.tasks[: state["tasks_done"]]:
            self.grow(task)
        self.net.load_state_dict(state["net"])
        self.net.to(self.device)
        self.known, self.total = state["known"], state["total"]
        self.tasks_done = state["tasks_done"]
        self.load_extra_state(state.get("extra") or {})
        if state.get("memory") is not None and self.memory is not None:
            self.memory.load_state_dict(state["memory"])
