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
  classes); a method with its own decision rule may add "pred" (B,) and "task_il_logits", and one
  with a better open-set score than the max-softmax of "logits" adds "known_score" (B,), higher for
  images of classes it has learned, and names it in `known_score_name` (results.json `openset.score`).
  A method whose headline classifier is not the softmax of "logits" (iCaRL's NME beside its CNN head)
  adds that classifier's class probabilities "probs" (B, n_seen): the ECE, the open-set max-softmax and
  the exported model's confidence are then that classifier's, as `headline_record` says. An extra
  classifier reported beside the headline adds its prediction as "pred_<name>" (results.json `extra`).
Device, AMP, progress bars, metrics, checkpoints and cost accounting come from the framework.
"""
from __future__ import annotations

import copy
import functools
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import NOT_DECLARED, Option
from dynammo.data.imageset import ImageSet
from dynammo.data.memory import ExemplarMemory
from dynammo.data.scenario import Scenario, Task
from dynammo.engine import Engine
from dynammo.errors import UserError
from dynammo.methods.frozen import no_weights_deviation
from dynammo.models.backbones import backbone_has_stages, backbone_kwargs, build_backbone
from dynammo.models.network import IncrementalNet
from dynammo.optim import OptimSettings


def _counting_tasks(begin_task):
    """The framework keeps a method's task counters: they are set before any `begin_task` runs
    (the runner's, `grow`'s, a test's), so overrides only build structure."""
    @functools.wraps(begin_task)
    def begin(self, task: Task) -> None:
        self.known, self.total = task.start, task.end
        self.tasks_done = task.id + 1
        begin_task(self, task)
    begin.counts_tasks = True
    return begin


class Method:
    options: Dict[str, Option] = {}  # method-specific config keys
    uses_memory = False
    summary = ""
    # the open-set score: "max_softmax" (the runner's default) or the name of what predict returns
    # as "known_score"
    known_score_name = "max_softmax"
    # the pretrained backbone a frozen-backbone paper starts from; a run without weights says so
    paper_backbone: Optional[str] = None

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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("begin_task")
        if own is not None and not getattr(own, "counts_tasks", False):
            cls.begin_task = _counting_tasks(own)

    # ---- configuration checks, before anything is written ----
    @classmethod
    def backbone_needs(cls, cfg) -> tuple:
        """What the method needs of the backbone beyond a feature vector (residual stages, a last ReLU
        to drop), as (need, alternative): `need` completes "method 'x' needs ...", `alternative` is
        another way out added to the error (" or set last_relu=true"); ("", "") when nothing.
        check_config refuses a Vision Transformer for such a method before anything is built."""
        return "", ""

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        need, alternative = cls.backbone_needs(cfg)
        if need and not backbone_has_stages(cfg.backbone):
            from dynammo.models.backbones.vit import no_stages_message

            raise UserError(no_stages_message(cfg.backbone, f"method '{cfg.method}' needs {need}", alternative))
        if cls.uses_memory:
            if not cfg.memory_per_class and cfg.memory_size <= 0:
                raise UserError(f"method '{cfg.method}' needs an exemplar memory; set memory_size=N (e.g. 2000) or memory_per_class=N")
            ExemplarMemory.from_config(cfg).check_budget(num_classes)

    # ---- several processes (torchrun; see distributed.py) ----
    @classmethod
    def distributed_problem(cls, cfg) -> Optional[str]:
        """Why the method, as configured, would not train exactly on several processes (a loss
        that depends on the whole batch, ...), or None."""
        return None

    @classmethod
    def check_distributed(cls, cfg) -> None:
        problem = cls.distributed_problem(cfg)
        if problem:
            raise UserError(f"method '{cfg.method}' cannot train on several processes: {problem}; "
                            "run it as one process (without torchrun)")

    # ---- what the run departs from the paper in (results.json `deviations`, every table) ----
    @classmethod
    def variant_options(cls, cfg) -> Dict[str, object]:
        """The method's options whose value differs from the paper's (declared as Option.faithful)."""
        return {key: cfg.get(key) for key, opt in cls.options.items()
                if opt.faithful is not NOT_DECLARED and cfg.get(key) != opt.faithful}

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        """One line per place where the run, as configured, departs from the method's paper. Methods
        add their own to these option-level ones and the no-weights line."""
        def paper(key):
            value = cls.options[key].faithful
            return "unset" if value is None else value

        out = [f"{key}={value} instead of the paper's {paper(key)}: {cls.options[key].help}"
               for key, value in cls.variant_options(cfg).items()]
        if cls.paper_backbone and not cfg.pretrained:
            out.append(no_weights_deviation(cfg, cls.paper_backbone))
        return out

    @classmethod
    def headline_record(cls, cfg) -> Dict[str, str]:
        """The classifier the headline metrics (acc, mcr, ece, openset) belong to and what its
        confidence is: results.json `classifier` / `confidence`, metrics.csv `classifier`."""
        return {"classifier": "head", "confidence": "softmax of the logits, at the predicted class"}

    @classmethod
    def label(cls, cfg) -> str:
        """The name a table prints: the method, and the variant options it runs with."""
        changed = cls.variant_options(cfg)
        return f"{cfg.method} [{', '.join(f'{k}={v}' for k, v in changed.items())}]" if changed else cfg.method

    # ---- model ----
    def build_network(self) -> nn.Module:
        return IncrementalNet(build_backbone(self.cfg.backbone, self.cfg.pretrained,
                                             **backbone_kwargs(self.cfg, self.scenario)))

    def train_mode(self) -> None:
        self.net.train()

    def eval_mode(self) -> None:
        self.net.eval()

    # ---- lifecycle ----
    @_counting_tasks
    def begin_task(self, task: Task) -> None:
        """Grow the structure for `task` (the counters known/total/tasks_done are already set)."""
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

    def extra_cost(self) -> dict:
        """Cost fields beside the framework's, for the structure as it stands (the run's `cost` rows
        and `dynammo cost` alike), e.g. RanPAC's `statistics_bytes`; must not need data."""
        return {}

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


# ---- the evaluation contract (the runner enforces it; no method overrides it) ----
def held_modules(method) -> Dict[str, nn.Module]:
    """Every nn.Module a method holds, by attribute name: `net` and any other module attribute
    (teachers, old networks, bias layers or adapters kept outside `net`), including modules kept
    in a list, tuple or dict attribute ("old_nets[0]", "heads['a']")."""
    found: Dict[str, nn.Module] = {}
    for name, value in vars(method).items():
        if isinstance(value, nn.Module):
            found[name] = value
        elif isinstance(value, (list, tuple)):
            found.update({f"{name}[{i}]": v for i, v in enumerate(value) if isinstance(v, nn.Module)})
        elif isinstance(value, dict):
            found.update({f"{name}[{k!r}]": v for k, v in value.items() if isinstance(v, nn.Module)})
    return found


def modules_in_training_mode(method) -> List[str]:
    """Paths ("net.backbone.bn1", "teacher") of the modules a method holds that have training=True;
    a module shared by two attributes is named once."""
    seen, paths = set(), []
    for attr, module in held_modules(method).items():
        for sub, m in module.named_modules(prefix=attr):
            if id(m) in seen:
                continue
            seen.add(id(m))
            if m.training:
                paths.append(f"{sub} ({type(m).__name__})")
    return paths


def check_eval_mode(method) -> None:
    """Raise if any module the method holds is still in training mode after `eval_mode()`: with
    BatchNorm in training mode a prediction depends on the other images of its batch (and the
    running statistics change), so the accuracy would depend on the evaluation batch size. This is a
    programming error of the method, not of the user's input."""
    left = modules_in_training_mode(method)
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise RuntimeError(f"method '{method.cfg.method}' ({type(method).__name__}) left modules in training mode "
                           f"at evaluation: {shown}; its eval_mode() must put every module it holds in eval mode "
                           "(call .eval() on them)")
