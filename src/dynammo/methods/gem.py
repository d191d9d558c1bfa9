"""GEM: Gradient Episodic Memory (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017).

- Episodic memory per task: after t tasks every task keeps memory_size // t samples (split evenly
  over its classes; older tasks are truncated in selection order). With `memory_per_class` every
  class keeps that many instead.
- Every training step: g = the gradient of the current batch's loss; g_k = the gradient of the loss
  on task k's memory, for every earlier task k. If some <g, g_k> < 0, g is replaced by the
  projection g~ = g + G^T v, v the solution of the dual quadratic program (paper eq. 10-11)
      min_v 1/2 v^T G G^T v + (G g)^T v   subject to  v >= margin,
  solved with `quadprog`. `gem_margin` is the paper's "memory strength" (0.5 by default); with
  margin 0 this is the exact Euclidean projection onto {g~ : <g~, g_k> >= 0 for all k}.
- Loss scope (`gem_loss_scope`): the paper (task-incremental) evaluates each task's loss on that
  task's outputs only, and so does the reference framework (CL_Pytorch): "task" (the default)
  restricts the current batch's loss to the new classes and task k's memory loss to task k's
  classes. "seen" takes every loss over all classes seen so far (class-IL reimplementations such
  as Mammoth): a new class stealing an old sample's prediction then raises that task's memory loss.
- BatchNorm (`gem_memory_forward`): the paper's code runs one forward pass per old task's memory
  and one for the current batch ("separate", the default), so in training every batch BatchNorm
  normalises holds ONE task. In class-IL the network then learns to separate tasks through the
  batch statistics, which test batches (all classes mixed, running statistics) do not have: on
  MedNIST 3x2 (mednist_cpu, memory 200, seed 1993) the last task reached 99% training accuracy but
  51% test accuracy, HeadCT test images going to the old class Hand. The named variant "joint"
  (dynammo's, not the paper's; results.json lists it under `deviations` and tables label the run
  `gem [gem_memory_forward=joint]`) passes the current batch and every old task's memory batch
  through the network at once and takes each g_k from its slice of that pass.
- The paper uses a task's whole memory at every step; `gem_mem_batch` optionally uses a random
  subset of each task's memory per step (cheaper, for CPU runs; recorded as a deviation).
- The update is the projected gradient, as the paper's plain SGD step: momentum, Adam and AdamW
  are refused (they step away from the projected gradient, so the constraints would not hold for
  the step taken). Weight decay is folded into the gradient before the projection (g + wd·θ is
  projected and the optimiser runs without weight decay), so the step taken is the projected one.
- Memory selection follows `sampling_method` (herding in the reference framework's configs; the
  paper keeps the last samples of each task's stream, close to `random`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.memory import select
from dynammo.data.scenario import Task, task_sizes
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.optim import OptimSettings


def require_quadprog():
    try:
        import quadprog
    except ImportError as exc:
        raise UserError("method 'gem' needs the quadprog package to solve its quadratic program; "
                        "install it with `pip install quadprog`") from exc
    return quadprog


def project_to_cone(g: torch.Tensor, old: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """GEM's projection of the gradient g (p,) given the old tasks' gradients old (t, p).

    Solves min_v 1/2 v^T P v + q^T v s.t. v >= margin, with P = old old^T and q = old g, and
    returns g + old^T v. Only the t x t problem goes to the solver (on the CPU, in float64);
    the big matrix products stay on g's device and dtype.
    """
    quadprog = require_quadprog()
    p_mat = (old @ old.T).double().cpu().numpy()
    q = (old @ g).double().cpu().numpy()
    t = len(q)
    p_mat = 0.5 * (p_mat + p_mat.T)
    scale = max(float(np.trace(p_mat)) / t, 1e-30)
    # quadprog needs P positive definite; a tiny ridge (relative to the gradients' scale) makes it
    # so when old-task gradients are linearly dependent, at a constraint error of ridge * v.
    for ridge in (1e-10, 1e-6, 1e-3):
        try:
            v = quadprog.solve_qp(p_mat + ridge * scale * np.eye(t), -q, np.eye(t), np.full(t, float(margin)))[0]
            break
        except ValueError:
            continue
    else:
        raise RuntimeError(f"GEM's quadratic program has no solution for {t} task gradients")
    return g + torch.as_tensor(v, dtype=old.dtype, device=old.device) @ old


def flat(grads: Sequence[Optional[torch.Tensor]], params: Sequence[nn.Parameter]) -> torch.Tensor:
    """One vector of per-parameter gradients (None, for a parameter the loss does not reach, is zero)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return flat([p.grad for p in params], params)


def write_grad(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def task_memory_quotas(memory_size: int, sizes: List[int]) -> List[int]:
    """Exemplars per class of each seen task: memory_size // n_tasks per task, split over its classes."""
    per_task = memory_size // max(len(sizes), 1)
    return [per_task // s for s in sizes]


@METHODS.register("gem", aliases=("gem_il", "gradient_episodic_memory"))
class GEM(Method):
    summary = "Gradient Episodic Memory: per-task memory, gradient projected by a QP (NeurIPS 2017)"
    uses_memory = True
    options = {
        "gem_margin": Option("float", 0.5, "memory strength: the QP's dual variables are at least this (paper: 0.5)",
                             min=0.0),
        "gem_loss_scope": Option("str", "task", "classes a loss is taken over: task (the sample's task only, as "
                                                "the paper and the reference framework) | seen (every seen class)",
                                 choices=("task", "seen"), faithful="task"),
        "gem_memory_forward": Option("str", "separate", "separate: one forward pass per old task's memory (the "
                                                        "paper's code) | joint: the current batch and every old "
                                                        "task's memory batch in one pass, so BatchNorm sees mixed "
                                                        "batches (dynammo's variant)",
                                     choices=("separate", "joint"), faithful="separate"),
        "gem_mem_batch": Option("int", None, "memory samples per old task per step (default: the whole task memory, "
                                             "as the paper)", min=1, faithful=None),
    }

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        require_quadprog()
        if cfg.opt_type != "sgd" or cfg.opt_mom > 0:
            raise UserError(f"GEM steps along the projected gradient: it needs plain SGD (opt_type=sgd, opt_mom=0), "
                            f"got opt_type={cfg.opt_type} opt_mom={cfg.opt_mom}; momentum or Adam would step "
                            "away from the projection (weight decay is fine: it is projected with the gradient)")
        if cfg.memory_per_class or isinstance(cfg.dataset, list):
            return  # a fixed per-class quota, or a stream whose task sizes come from the data
        sizes = task_sizes(num_classes, cfg.init_cls, cfg.increment)
        quotas = task_memory_quotas(cfg.memory_size, sizes)
        if min(quotas) < 1:
            raise UserError(f"memory_size={cfg.memory_size} split over {len(sizes)} tasks leaves a class of a "
                            f"{max(sizes)}-class task no exemplar; raise memory_size to at least "
                            f"{len(sizes) * max(sizes)} or set memory_per_class")

    def __init__(self, cfg, engine, scenario):
        super().__init__(cfg, engine, scenario)
        self.old_memories: List[tuple] = []  # (raw images on the device, labels, task) per earlier task
        self.current: Optional[Task] = None  # the task being trained
        self.old_gradients: Optional[torch.Tensor] = None  # (old tasks, params) of the current step (joint)
        self.weight_decay = 0.0  # of the stage being trained, folded into the gradient before projecting

    # ---- losses ----
    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        if self.cfg.gem_loss_scope == "task":
            return F.cross_entropy(logits[:, task.start: task.end], y - task.start)
        return F.cross_entropy(logits, y)

    def loss_on(self, x: torch.Tensor, y: torch.Tensor, task: Task):
        logits = self.net(x)
        return self.task_loss(logits, y, task), logits

    def step(self, batch: Batch):
        if self.old_memories and self.cfg.gem_memory_forward == "joint":
            return self.joint_step(batch)
        loss, logits = self.loss_on(batch.x, batch.y, self.current)
        return loss, logits, batch.y

    def joint_step(self, batch: Batch):
        """One forward pass of [current batch; a memory batch of every old task]: BatchNorm normalises
        all of them with the same mixed statistics. Each old task's gradient g_k is taken from its
        slice of that pass now (kept for `project`); the current loss is returned for the engine."""
        parts = [(batch.x, batch.y, self.current)]
        parts += [(self.engine.train_tf(raw, self.engine.generator), y, task)
                  for raw, y, task in map(self.memory_batch, self.old_memories)]
        logits = self.net(torch.cat([x for x, _, _ in parts])).split([len(y) for _, y, _ in parts])
        params = self.trainable_params()
        self.old_gradients = torch.stack([
            flat(torch.autograd.grad(self.task_loss(out, y, task), params, retain_graph=True, allow_unused=True),
                 params)
            for out, (_, y, task) in zip(logits[1:], parts[1:])])
        return self.task_loss(logits[0], batch.y, self.current), logits[0], batch.y

    # ---- training ----
    def trainable_params(self) -> List[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def train_task(self, task: Task) -> None:
        self.current = task
        self.old_memories = self.load_old_memories(task)
        self.train_mode()
        params = self.trainable_params()
        settings = OptimSettings.from_config(self.cfg, first_task=task.id == 0)
        # weight decay joins the gradient before the projection, so the step taken is the projected one
        self.weight_decay, settings.weight_decay = settings.weight_decay, 0.0
        hook = (lambda: self.project(params)) if self.old_memories else self.add_weight_decay_hook(params)
        self.engine.fit(params, self.scenario.train_data(task), self.step, settings, before_step=hook)
        self.old_memories, self.old_gradients = [], None

    def add_weight_decay_hook(self, params):
        """Without old tasks there is nothing to project: the step is SGD on loss + wd/2·|θ|²."""
        if not self.weight_decay:
            return None

        def hook():
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.add_(p.detach(), alpha=self.weight_decay)
        return hook

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        out = super().deviations(cfg)
        if cfg.sampling_method != "random":
            out.append(f"memory chosen by {cfg.sampling_method} (the paper keeps each task's last samples, close to random)")
        return out

    def load_old_memories(self, task: Task) -> List[tuple]:
        out = []
        for old in self.scenario.tasks[: task.id]:
            sets = [self.memory.per_class[c] for c in old.classes if c in self.memory.per_class]
            labels = torch.cat([s.labels for s in sets]) if sets else torch.zeros(0, dtype=torch.long)
            if len(labels):
                raw = torch.cat([s.get(torch.arange(len(s))) for s in sets])
                out.append((raw.to(self.device), labels.to(self.device), old))
        return out

    def memory_batch(self, memory: tuple) -> tuple:
        """An old task's (raw, labels, task): all of it, or gem_mem_batch random samples of it."""
        raw, labels, task = memory
        if self.cfg.gem_mem_batch and len(labels) > self.cfg.gem_mem_batch:
            idx = torch.randperm(len(labels), generator=self.engine.generator)[: self.cfg.gem_mem_batch]
            raw, labels = raw[idx.to(raw.device)], labels[idx.to(labels.device)]
        return raw, labels, task

    def memory_gradient(self, params, raw: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
        """g_k from a forward pass of task k's memory alone (gem_memory_forward: separate)."""
        raw, labels, task = self.memory_batch((raw, labels, task))
        for p in params:
            p.grad = None
        with self.engine.autocast():
            loss, _ = self.loss_on(self.engine.train_tf(raw, self.engine.generator), labels, task)
        loss.backward()
        return flat_grad(params)

    def project(self, params: Sequence[nn.Parameter]) -> None:
        """before_step hook: replace the current gradient by its GEM projection when it would raise
        the loss of an earlier task's memory."""
        g = flat_grad(params)
        if self.weight_decay:
            g = g + self.weight_decay * flat([p.detach() for p in params], params)
        if self.cfg.gem_memory_forward == "joint":
            # each process took them from its own slice's mixed BatchNorm pass: one value for all
            old = self.engine.world.mean_(self.old_gradients.clone())
        else:
            old = torch.stack([self.memory_gradient(params, raw, y, t) for raw, y, t in self.old_memories])
        if bool(((old @ g) < 0).any()):
            g = project_to_cone(g, old, self.cfg.gem_margin)
        write_grad(params, g)

    # ---- memory: split over the tasks seen ----
    def class_quotas(self, seen: Sequence[Task]) -> List[int]:
        """Exemplars per class of each task in `seen` (every task learned so far)."""
        if self.memory.memory_per_class:
            return [self.memory.memory_per_class] * len(seen)
        return task_memory_quotas(self.memory.memory_size, [t.size for t in seen])

    def memory_budget(self, n_seen: int) -> int:
        seen = [t for t in self.scenario.tasks if t.end <= n_seen]
        return sum(q * t.size for q, t in zip(self.class_quotas(seen), seen))

    def end_task(self, task: Task) -> None:
        self.eval_mode()
        seen = self.scenario.tasks[: task.id + 1]
        quotas = self.class_quotas(seen)
        for old, m in zip(seen[:-1], quotas[:-1]):
            for c in old.classes:
                if c in self.memory.per_class:
                    kept = self.memory.per_class[c]
                    self.memory.per_class[c] = kept.subset(torch.arange(min(m, len(kept))))
        data = self.scenario.train_data(task)
        for c in task.classes:
            cls_data = data.of_classes([c])
            idx = select(self.memory.sampling_method, cls_data, quotas[-1], self.features, self.engine.generator)
            self.memory.per_class[c] = cls_data.subset(idx)
