"""The shared training machinery: mixed precision, progress, divergence checks, and the one `fit`
every method and every stage of a method trains with."""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn as nn

from dynammo.batch import Batch, EpochSums, LossFn
from dynammo.compute import compute_path
from dynammo.console import Console
from dynammo.data.imageset import ImageSet
from dynammo.data.loader import epoch_order, iterate_batches, num_batches
from dynammo.data.transforms import BatchTransform
from dynammo.errors import RunInterrupted, UserError, is_allocation_failure
from dynammo.distributed import World
from dynammo.global_batchnorm import trains_batchnorm, training_step
from dynammo.journal import FitJournal, rng_state, set_rng_state
from dynammo.optim import OptimSettings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Passes whose outputs feed training (herding features, class means, weight imprinting, BatchNorm
# re-estimation) run at this fixed batch: a float result depends slightly on the batch it was
# computed in, and eval_batch_size must not change what a run trains (it is result-neutral).
INTERNAL_BATCH_SIZE = 256

# A stage diverged when its last epoch's mean loss ends above both DIVERGENCE_RATIO times its first
# epoch's and DIVERGENCE_FLOOR (a loss that doubles from 0.01 is noise, not divergence); a loss that
# turns NaN or infinite stops the run (`_end_epoch`).
DIVERGENCE_RATIO = 2.0
DIVERGENCE_FLOOR = 1.0


def diverged(first_loss: float, last_loss: float) -> bool:
    return last_loss > DIVERGENCE_RATIO * first_loss and last_loss > DIVERGENCE_FLOOR



def _allocation_guard(batch_key: str):
    """A failed allocation inside (CPU allocator, CUDA out of memory) -> one line naming the keys
    that size it, not a traceback. An `apply` pass without a batch_size runs at the fixed internal
    batch, which no key sizes."""
    def deco(fn):
        @functools.wraps(fn)
        def guarded(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (MemoryError, RuntimeError) as exc:
                if not is_allocation_failure(exc):
                    raise
                cfg = self.cfg
                internal = fn.__name__ == "apply" and not kwargs.get("batch_size") and len(args) < 3
                where = (f"the internal batch of {INTERNAL_BATCH_SIZE} images (features that feed training)"
                         if internal else f"{batch_key}={cfg.get(batch_key)}")
                lower = "img_size" if internal else f"{batch_key} or img_size"
                raise UserError(f"out of memory on {self.device} ({exc.__class__.__name__}) at {where}, img_size="
                                f"{cfg.get('img_size')}, backbone {cfg.get('backbone')}; lower {lower}") from None
        return guarded
    return deco


class Engine:
    """Trains and applies networks for a method. The runner attaches the run's TensorBoard writer
    and fit journal (`attach_run`) and opens every task (`begin_task`); methods call `fit` per
    stage and `apply` for inference."""

    def __init__(self, cfg, console: Console, device: torch.device, seed: int, world: Optional[World] = None):
        self.cfg = cfg
        self.console = console
        self.device = device
        self.world = world or World()
        self.generator = torch.Generator().manual_seed(seed)
        self.train_tf: Optional[BatchTransform] = None
        self.test_tf: Optional[BatchTransform] = None
        self.tb = None  # a SummaryWriter (attach_run)
        self.journal: Optional[FitJournal] = None  # the task's fit journal, for exact resumption (attach_run)
        self.task_label = ""
        self.trained_params: Dict[int, int] = {}  # id -> numel of every parameter trained this task
        self.stages: List[dict] = []  # the fit stages of this task: stage, epochs, images
        self.diverged: List[dict] = []  # the stages of this task whose loss diverged: stage, first/last loss
        self.last_optimizer_state: Optional[dict] = None
        self._tb_step: Dict[str, int] = {}
        self.compute = compute_path(cfg, device)  # autocast dtype and image layout (config amp, memory_format)
        self.amp = self.compute.amp_dtype is not None
        # raised by a SIGINT/SIGTERM handler: stop at the next batch boundary (after a partial checkpoint)
        self.stop_requested: Optional[str] = None
        self.checkpoint_every = int(cfg.get("checkpoint_every", 0) or 0)
        # the method's current network (build_run): its layout is prepared for the compute path, and
        # on several processes its BatchNorm layers tell whether an empty slice joins a step
        self.network: Callable[[], Optional[nn.Module]] = lambda: None

    def set_transforms(self, train_tf: BatchTransform, test_tf: BatchTransform) -> None:
        self.train_tf, self.test_tf = train_tf, test_tf

    def attach_run(self, tb=None, journal: Optional[FitJournal] = None) -> None:
        self.tb, self.journal = tb, journal

    def begin_task(self, label: str) -> None:
        """A new task: its accounting starts empty; a distributed run aligns every rank's RNGs on
        rank 0's (what a task builds, e.g. a new head, is drawn from them)."""
        self.task_label, self.trained_params, self.stages, self.diverged = label, {}, [], []
        if self.world.distributed:
            set_rng_state(self.world.broadcast(rng_state(self.generator)), self.generator)
        if self.journal is not None:
            self.journal.start_task()

    def end_task(self) -> "TaskLog":
        if self.journal is not None:
            self.journal.end_task()
        return TaskLog(int(sum(self.trained_params.values())), sum(st["images"] for st in self.stages),
                       list(self.stages), list(self.diverged))

    def should_stop(self) -> bool:
        """Whether to stop now; in a distributed run every rank answers alike."""
        return self.world.any(bool(self.stop_requested))

    def autocast(self):
        return self.compute.autocast()

    @_allocation_guard("batch_size")
    def fit(self, params: Iterable[nn.Parameter], data: ImageSet, loss_fn: LossFn, settings: OptimSettings,
            stage: str = "train", before_step: Optional[Callable[[], None]] = None, augment: bool = True,
            after_step: Optional[Callable[[], None]] = None) -> dict:
        """Train `params` on `data` for settings.epochs epochs of loss_fn. Returns the last epoch's stats.

        before_step runs between backward and the optimiser step (GEM's gradient projection);
        after_step runs right after every optimiser step (WA's weight clipping). The journal (when
        attached) is consulted at four points: a call that finished before an interruption is
        restored, an interrupted one resumes, a stop saves a partial point, the end is recorded."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"stage {stage}: nothing to train")
        if len(data) == 0:
            raise UserError(f"stage {stage} of {self.task_label} has no training images; check the split and memory settings")
        for p in params:
            self.trained_params[id(p)] = p.numel()
        # the training budget, as tables print it: epochs and images through the network per stage
        self.stages.append({"stage": stage, "epochs": settings.epochs, "images": settings.epochs * len(data)})
        call = self.journal.fit_call(params, self.generator) if self.journal is not None else None
        if call is not None and call.finished is not None:
            self.last_optimizer_state = call.finished["optimizer"]
            self.console.print(f"{self.task_label} {stage}: restored from the interrupted run")
            self._check_divergence(stage, call.finished["stats"], settings.epochs)
            return call.finished["stats"]
        self.compute.prepare_module(self.network())  # channels-last weights: no reorder per convolution
        opt = settings.optimizer(params)
        sched = settings.schedule(opt)
        scaler = torch.amp.GradScaler("cuda") if self.compute.uses_grad_scaler else None
        tf = self.train_tf if augment else self.test_tf
        n_batches = num_batches(len(data), settings.batch_size)
        resume = call.resume(opt, sched, scaler) if call is not None else None
        start_epoch, stats = (resume["epoch"], resume["stats"]) if resume else (0, {})
        if resume:
            self.console.print(f"{self.task_label} {stage}: resuming at epoch {start_epoch + 1} batch {resume['batch'] + 1}")

        def save_point(epoch: int, batch: int, order, sums) -> None:
            if call is not None:
                call.save(epoch, batch, order, sums, opt, sched, scaler, stats)

        for epoch in range(start_epoch, settings.epochs):
            t0 = time.perf_counter()
            if resume is not None and resume["batch"] > 0:  # the interrupted epoch: same order, next batch
                order, first, sums = resume["order"], resume["batch"], EpochSums(self.device, resume["sums"])
            else:
                order, first, sums = epoch_order(len(data), True, self.generator), 0, EpochSums(self.device)
            resume = None
            bar = self.console.bar(n_batches, f"{self.task_label} {stage} epoch {epoch + 1}/{settings.epochs}")
            if bar is not None and first:
                bar.update(first)
            batches = iterate_batches(data, settings.batch_size, order=order, start_batch=first,
                                      num_workers=self.cfg.num_workers)
            for i, (raw, y, idx) in enumerate(batches, start=first):
                batch = self._batch(raw, y, idx, tf, data.aspect_of(idx))
                stop = self._train_step(batch, len(y), params, loss_fn, opt, scaler, before_step, after_step, sums)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        loss, acc = sums.totals(World())
                        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc or 0.0:.1f}")
                if stop and i + 1 < n_batches:
                    if bar is not None:
                        bar.close()
                    save_point(epoch, i + 1, order, sums.state())
                    raise RunInterrupted(f"{self.stop_requested or 'a signal to another process'} in "
                                         f"{self.task_label} {stage} epoch {epoch + 1}")
            if bar is not None:
                bar.close()
            lr = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            stats = self._end_epoch(sums, lr, stage, epoch, settings.epochs, time.perf_counter() - t0,
                                    stats.get("first_loss"))
            more = epoch + 1 < settings.epochs
            stop = more and self.should_stop()
            if stop or (more and self.checkpoint_every and (epoch + 1) % self.checkpoint_every == 0):
                save_point(epoch + 1, 0, None, None)
                if stop:
                    raise RunInterrupted(f"{self.stop_requested or 'a signal to another process'} in "
                                         f"{self.task_label} {stage} after epoch {epoch + 1}")
        self._check_divergence(stage, stats, settings.epochs)
        self.last_optimizer_state = opt.state_dict()
        if call is not None:
            call.finish(stats, self.last_optimizer_state)
        return stats

    def _batch(self, raw: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, tf: BatchTransform,
               aspect: Optional[torch.Tensor] = None) -> Batch:
        """The global batch on the device, augmented with the shared generator (the same draws on
        every rank and as in one process), then this rank's contiguous slice of it. aspect: the
        images' original height / width where recorded (ImageSet.aspect)."""
        raw = raw.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        x = tf(raw, self.generator, aspect)
        if not self.world.distributed:
            return Batch(x, y, raw, idx)
        start, end = self.world.share(len(y))
        return Batch(x[start:end], y[start:end], raw[start:end], idx[start:end], global_y=y)

    def _train_step(self, batch: Batch, global_n: int, params, loss_fn: LossFn, opt, scaler, before_step,
                    after_step, sums: EpochSums) -> bool:
        """One optimiser step on the global batch; returns whether to stop after it.

        On several processes each slice's loss is weighted by its share of the global batch before
        backward (so BatchNorm's backward sums the global loss's gradient), and the gradients are
        summed over processes. A process whose slice of a short last batch is empty still runs the
        step when BatchNorm trains, to take part in its collectives (its weight is 0)."""
        opt.zero_grad(set_to_none=True)
        n = len(batch.y)
        if n or trains_batchnorm(self.network()):
            with training_step(self.world):
                with self.autocast():
                    loss, logits, target = loss_fn(batch)
                weighted = loss * (n / global_n) if self.world.distributed else loss
                if scaler is not None:
                    scaler.scale(weighted).backward()
                else:
                    weighted.backward()
            if n:
                sums.add(loss, n, logits, target)
        stop = self.world.reduce_gradients(params, bool(self.stop_requested))
        if scaler is not None:
            scaler.unscale_(opt)
        if before_step is not None:
            before_step()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if after_step is not None:
            after_step()
        return stop

    def _end_epoch(self, sums: EpochSums, lr: float, stage: str, epoch: int, epochs: int, seconds: float,
                   first_loss: Optional[float]) -> dict:
        """The epoch's stats; `first_loss` (the stage's first epoch's mean loss) travels with them, so
        a resumed stage still knows where it started."""
        mean_loss, acc = sums.totals(self.world)
        if not math.isfinite(mean_loss):
            raise UserError(f"training diverged: loss is {mean_loss} in {self.task_label} {stage} epoch {epoch + 1}; "
                            "lower lrate or use amp=false")
        stats = {"loss": mean_loss, "acc": acc, "lr": lr, "seconds": seconds,
                 "first_loss": mean_loss if first_loss is None else first_loss}
        acc_txt = f" acc {acc:.1f}%" if acc is not None else ""
        self.console.print(f"{self.task_label} {stage} epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}"
                           f"{acc_txt} lr {lr:.2g} ({seconds:.1f}s)")
        self._tb_scalar(f"train/{stage}/loss", mean_loss)
        if acc is not None:
            self._tb_scalar(f"train/{stage}/acc", acc)
        return stats

    def _check_divergence(self, stage: str, stats: dict, epochs: int) -> None:
        """A stage whose loss ended far above where it started is recorded (results.json
        `diverged_stages`, the report's tables) and named in one warning line."""
        first, last = stats.get("first_loss"), stats.get("loss")
        if first is None or last is None or not diverged(first, last):
            return
        self.diverged.append({"stage": stage, "first_loss": first, "last_loss": last})
        self.console.print(f"warning: {self.task_label} {stage} diverged: mean loss {first:.4f} in epoch 1, {last:.4f} "
                           f"in epoch {epochs}; its results are marked diverged (lower lrate)")

    def _tb_scalar(self, tag: str, value: float) -> None:
        if self.tb is not None:
            step = self._tb_step.get(tag, 0)
            self.tb.add_scalar(tag, value, step)
            self._tb_step[tag] = step + 1

    @_allocation_guard("eval_batch_size")
    @torch.no_grad()
    def apply(self, fn: Callable[[torch.Tensor], object], data: ImageSet, batch_size: Optional[int] = None,
              shard: bool = True):
        """Run fn on every (test-transformed) batch of data; returns the outputs concatenated
        (a tensor, or a dict of tensors). batch_size: the evaluation's (eval_batch_size), for passes
        that only measure; without it, INTERNAL_BATCH_SIZE, whatever eval_batch_size says. A
        distributed run splits the batches into contiguous shards, one per rank, and gathers them in
        order: every rank gets all outputs, each image once. shard=False: every rank runs every
        batch (a pass whose side effect, BatchNorm re-estimation, every rank must share)."""
        batch_size = batch_size or INTERNAL_BATCH_SIZE
        sharded = self.world.distributed and shard
        if sharded:  # this rank's whole batches: the same batches as one process
            start, end = self.world.share(num_batches(len(data), batch_size))
            data = data.subset(torch.arange(min(start * batch_size, len(data)), min(end * batch_size, len(data))))
        outs = []
        for raw, _, idx in iterate_batches(data, batch_size, shuffle=False, num_workers=self.cfg.num_workers):
            x = self.test_tf(raw.to(self.device, non_blocking=True), aspect=data.aspect_of(idx))
            with self.autocast():
                outs.append(_to_cpu(fn(x)))
        if sharded:
            outs = [o for part in self.world.gather(outs) for o in part]
        if not outs:
            return None
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)


def _to_cpu(out):
    """A batch's outputs as float CPU tensors (a tensor or a dict of tensors): float32, or float64
    when computed in float64."""
    if isinstance(out, dict):
        return {k: _as_float(v).cpu() for k, v in out.items()}
    return _as_float(out).cpu()


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


@dataclass
class TaskLog:
    """What a task's training cost: parameters trained, images through the network, its stages."""
    params_trainable: int
    train_images: int
    stages: List[dict]
    diverged: List[dict] = field(default_factory=list)  # stages whose loss diverged: stage, first/last loss
