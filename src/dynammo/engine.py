"""The shared training machinery: device, optimisers, schedules, mixed precision, progress, and
the one `fit` every method and every stage of a method trains with."""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from dynammo.console import Console
from dynammo.data.imageset import ImageSet
from dynammo.data.loader import epoch_order, iterate_batches, num_batches
from dynammo.data.transforms import BatchTransform
from dynammo.errors import RunInterrupted, UserError, is_allocation_failure
from dynammo.journal import FitJournal


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.isdigit():  # reference-framework style: a GPU index
        name = f"cuda:{name}"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"device '{name}' is not valid; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' asked for but CUDA is not available here; use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s); pick another index")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("device 'mps' asked for but MPS is not available here; use device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{name}' is not supported; use cpu, cuda, cuda:N or mps")
    return dev


@dataclass
class OptimSettings:
    """How one stage trains. `OptimSettings.from_config(cfg, "_finetune")` reads stage-specific keys
    (epochs_finetune, lrate_finetune, ...) falling back to the general ones."""

    epochs: int
    opt_type: str = "sgd"
    lrate: float = 0.01
    weight_decay: float = 0.0
    opt_mom: float = 0.9
    scheduler: str = "multi_step"
    milestones: List[int] = field(default_factory=list)
    lrate_decay: float = 0.1
    batch_size: int = 32

    @classmethod
    def from_config(cls, cfg, suffix: str = "", first_task: bool = False, **overrides) -> "OptimSettings":
        """first_task: use the reference framework's init_* keys (init_epochs, init_lrate, ...) when set."""
        def pick(key):
            if key in overrides:
                return overrides[key]
            v = cfg.get(key + suffix) if suffix else None
            if v is None and first_task and not suffix:
                v = cfg.get("init_" + key)
            return cfg[key] if v is None else v

        return cls(**{k: pick(k) for k in ("epochs", "opt_type", "lrate", "weight_decay", "opt_mom", "scheduler",
                                           "milestones", "lrate_decay", "batch_size")})

    def optimizer(self, params) -> torch.optim.Optimizer:
        if self.opt_type == "sgd":
            return torch.optim.SGD(params, lr=self.lrate, momentum=self.opt_mom, weight_decay=self.weight_decay)
        if self.opt_type == "adam":
            return torch.optim.Adam(params, lr=self.lrate, weight_decay=self.weight_decay)
        if self.opt_type == "adamw":
            return torch.optim.AdamW(params, lr=self.lrate, weight_decay=self.weight_decay)
        raise UserError(f"opt_type '{self.opt_type}' is not supported; use sgd, adam or adamw")

    def schedule(self, opt):
        if self.scheduler == "multi_step" and self.milestones:
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.lrate_decay)
        if self.scheduler == "cos":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        return None


@dataclass
class Batch:
    x: torch.Tensor  # transformed float images on the device
    y: torch.Tensor  # labels on the device
    raw: torch.Tensor  # the uint8 images (before augmentation), on the device
    index: torch.Tensor  # indices into the ImageSet being trained on


# A step's loss: returns (loss, logits for the running accuracy or None, targets for it or None)
LossFn = Callable[[Batch], Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def _allocation_guard(batch_key: str):
    """A failed allocation inside (CPU allocator, CUDA out of memory) -> one line naming the keys
    that size it, not a traceback."""
    def deco(fn):
        @functools.wraps(fn)
        def guarded(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (MemoryError, RuntimeError) as exc:
                if not is_allocation_failure(exc):
                    raise
                cfg = self.cfg
                raise UserError(f"out of memory on {self.device} ({exc.__class__.__name__}) at {batch_key}="
                                f"{cfg.get(batch_key)}, img_size={cfg.get('img_size')}, backbone {cfg.get('backbone')}; "
                                f"lower {batch_key} or img_size") from None
        return guarded
    return deco


class Engine:
    def __init__(self, cfg, console: Console, device: torch.device, seed: int):
        self.cfg = cfg
        self.console = console
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.train_tf: Optional[BatchTransform] = None
        self.test_tf: Optional[BatchTransform] = None
        self.tb = None  # a SummaryWriter, set by the runner
        self.task_label = ""
        self.trained_params: Dict[int, int] = {}  # id -> numel of every parameter trained this task
        self.stages: List[dict] = []  # the fit stages of this task: stage, epochs, images
        self.last_optimizer_state: Optional[dict] = None
        self._tb_step: Dict[str, int] = {}
        self.amp = bool(cfg.get("amp", False))
        # resumption (set by the runner): the task's fit journal, a writer of partial checkpoints,
        # and the flag a SIGINT/SIGTERM handler raises to stop at the next batch boundary
        self.journal: Optional[FitJournal] = None
        self.save_partial: Optional[Callable[[dict], None]] = None
        self.stop_requested: Optional[str] = None
        self.checkpoint_every = int(cfg.get("checkpoint_every", 0) or 0)

    def set_transforms(self, train_tf: BatchTransform, test_tf: BatchTransform) -> None:
        self.train_tf, self.test_tf = train_tf, test_tf

    def autocast(self):
        if not self.amp:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @_allocation_guard("batch_size")
    def fit(self, params: Iterable[nn.Parameter], data: ImageSet, loss_fn: LossFn, settings: OptimSettings,
            stage: str = "train", before_step: Optional[Callable[[], None]] = None, augment: bool = True,
            after_step: Optional[Callable[[], None]] = None) -> dict:
        """Train `params` on `data` for settings.epochs epochs of loss_fn. Returns the last epoch's stats.

        before_step runs between backward and the optimiser step (GEM's gradient projection);
        after_step runs right after every optimiser step (WA's weight clipping)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"stage {stage}: nothing to train")
        if len(data) == 0:
            raise UserError(f"stage {stage} of {self.task_label} has no training images; check the split and memory settings")
        for p in params:
            self.trained_params[id(p)] = p.numel()
        # the training budget, as tables print it: epochs and images through the network per stage
        self.stages.append({"stage": stage, "epochs": settings.epochs, "images": settings.epochs * len(data)})
        journal = self.journal
        index = journal.index if journal else 0
        if journal:
            journal.index += 1
            if index < len(journal.replay):  # finished before the interruption: restore its end state
                entry = journal.replay[index]
                journal.apply(entry["end"], params, self.generator)
                journal.finished.append(entry)
                self.last_optimizer_state = entry["optimizer"]
                self.console.print(f"{self.task_label} {stage}: restored from the interrupted run")
                return entry["stats"]
        opt = settings.optimizer(params)
        sched = settings.schedule(opt)
        scaler = torch.amp.GradScaler("cuda") if (self.amp and self.device.type == "cuda") else None
        tf = self.train_tf if augment else self.test_tf
        n_batches = num_batches(len(data), settings.batch_size)
        stats: dict = {}
        start_epoch, resume = 0, None
        if journal and journal.resume_current is not None and journal.resume_current["index"] == index:
            resume, journal.resume_current = journal.resume_current, None
            journal.apply(resume["snap"], params, self.generator)
            opt.load_state_dict(resume["optimizer"])
            if sched is not None:
                sched.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            start_epoch, stats = resume["epoch"], resume["stats"]
            self.console.print(f"{self.task_label} {stage}: resuming at epoch {start_epoch + 1} batch {resume['batch'] + 1}")

        def save_point(epoch: int, batch: int, order, sums) -> None:
            """A partial checkpoint: this fit at (epoch, batch), the finished fits of the task before it."""
            if journal is None or self.save_partial is None:
                return
            current = {"index": index, "epoch": epoch, "batch": batch, "order": order, "sums": sums,
                       "snap": journal.snapshot(params, self.generator), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict() if sched is not None else None,
                       "scaler": scaler.state_dict() if scaler is not None else None, "stats": stats}
            self.save_partial(journal.state(current))

        for epoch in range(start_epoch, settings.epochs):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            seen = 0
            counted = 0
            first = 0
            if resume is not None and resume["batch"] > 0:  # the interrupted epoch: same order, next batch
                order, first = resume["order"], resume["batch"]
                loss_sum += resume["sums"][0]
                correct += resume["sums"][1]
                seen, counted = resume["sums"][2], resume["sums"][3]
            else:
                order = epoch_order(len(data), True, self.generator)
            resume = None
            bar = self.console.bar(n_batches, f"{self.task_label} {stage} epoch {epoch + 1}/{settings.epochs}")
            if bar is not None and first:
                bar.update(first)
            batches = iterate_batches(data, settings.batch_size, order=order, start_batch=first,
                                      num_workers=self.cfg.num_workers)
            for i, (raw, y, idx) in enumerate(batches, start=first):
                raw = raw.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                batch = Batch(tf(raw, self.generator), y, raw, idx)
                with self.autocast():
                    loss, logits, target = loss_fn(batch)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if before_step is not None:
                    before_step()
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if after_step is not None:
                    after_step()
                loss_sum += loss.detach() * len(y)
                seen += len(y)
                if logits is not None:
                    correct += (logits.detach().argmax(1) == target).sum()
                    counted += len(target)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                        acc=f"{100 * correct.item() / max(counted, 1):.1f}")
                if self.stop_requested and i + 1 < n_batches:
                    if bar is not None:
                        bar.close()
                    save_point(epoch, i + 1, order, (loss_sum.cpu(), correct.cpu(), seen, counted))
                    raise RunInterrupted(f"{self.stop_requested} in {self.task_label} {stage} epoch {epoch + 1}")
            if bar is not None:
                bar.close()
            lr = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            mean_loss = loss_sum.item() / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise UserError(f"training diverged: loss is {mean_loss} in {self.task_label} {stage} epoch {epoch + 1}; "
                                "lower lrate or use amp=false")
            acc = 100.0 * correct.item() / counted if counted else None
            stats = {"loss": mean_loss, "acc": acc, "lr": lr, "seconds": time.perf_counter() - t0}
            acc_txt = f" acc {acc:.1f}%" if acc is not None else ""
            self.console.print(f"{self.task_label} {stage} epoch {epoch + 1}/{settings.epochs} loss {mean_loss:.4f}"
                               f"{acc_txt} lr {lr:.2g} ({stats['seconds']:.1f}s)")
            self._tb_scalar(f"train/{stage}/loss", mean_loss)
            if acc is not None:
                self._tb_scalar(f"train/{stage}/acc", acc)
            more = epoch + 1 < settings.epochs
            if more and (self.stop_requested or (self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0)):
                save_point(epoch + 1, 0, None, None)
                if self.stop_requested:
                    raise RunInterrupted(f"{self.stop_requested} in {self.task_label} {stage} after epoch {epoch + 1}")
        self.last_optimizer_state = opt.state_dict()
        if journal:
            journal.finished.append({"end": journal.snapshot(params, self.generator), "stats": stats,
                                     "optimizer": self.last_optimizer_state})
        return stats

    def _tb_scalar(self, tag: str, value: float) -> None:
        if self.tb is not None:
            step = self._tb_step.get(tag, 0)
            self.tb.add_scalar(tag, value, step)
            self._tb_step[tag] = step + 1

    @_allocation_guard("eval_batch_size")
    @torch.no_grad()
    def apply(self, fn: Callable[[torch.Tensor], object], data: ImageSet, batch_size: Optional[int] = None):
        """Run fn on every (test-transformed) batch of data; returns the outputs concatenated
        (a tensor, or a dict of tensors)."""
        outs = []
        for raw, _, _ in iterate_batches(data, batch_size or self.cfg.eval_batch_size, shuffle=False,
                                         num_workers=self.cfg.num_workers):
            x = self.test_tf(raw.to(self.device, non_blocking=True))
            with self.autocast():
                outs.append(fn(x))
        if not outs:
            return None
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k].float().cpu() for o in outs]) for k in outs[0]}
        return torch.cat([o.float().cpu() for o in outs])
