"""A pretraining run: config -> images -> backbone + SSL heads -> `Engine.fit` -> run directory.

Training goes through the framework's one `Engine.fit` (optimiser, schedule, progress, AMP,
SIGINT/SIGTERM, `checkpoint_every`), with `augment=False`: the loss makes its two views itself from
the batch's uint8 images with the engine's generator, and `after_step` does what follows each
optimiser step (MoCo's momentum update and queue push; at the end of an epoch the monitor).
Exact resumption uses the run's `FitJournal` (journal.py) as `dynammo run` does: a partial
checkpoint holds the trained parameters, the optimiser, the epoch's sample order and every RNG,
and `capture`/`restore` add what is not a trained parameter (BatchNorm statistics, MoCo's key
encoder and queue, the monitor's rows), so a resumed run ends bit for bit where an uninterrupted
one ends (on CPU). The lifecycle (log.txt, SIGINT/SIGTERM, the final status) is the one of
`dynammo run` (dynammo/run/session.py); the command's entry points are in command.py.

Run directory (`--out`, default runs/pretrain_<ssl_method>_<data>_<time>/):
  config.yaml      the resolved config (lrate and moco_queue as used)
  pretrain.json    status (running | complete | interrupted | failed), the images used, the
                   monitor's rows, the final k-NN accuracy, the time, deviations from the paper
  images.csv       every image pretrained on (file or split index, class when known, sha1)
  metrics.csv      one row per epoch: loss, k-NN accuracy, feature std / spread, seconds
  curves.png       the same as curves; log.txt; tb/ (TensorBoard scalars)
  checkpoints/     partial.pt while running (every checkpoint_every epochs and on a signal),
                   final.pt at the end (every network, the queue, the optimiser, the RNGs)
  backbone.pt      the backbone's state dict in torchvision/timm format: `pretrained: RUN/backbone.pt`
"""
from __future__ import annotations

import copy
import csv
import io
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from dynammo.batch import Batch
from dynammo.compute import resolve_device
from dynammo.console import Console
from dynammo.data.imageset import ImageSet
from dynammo.data.transforms import BatchTransform
from dynammo.distributed import launched_by_torchrun
from dynammo.engine import Engine, seed_everything
from dynammo.errors import UserError
from dynammo.io import save_torch_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic
from dynammo.journal import FitJournal, rng_state
from dynammo.models.backbones import backbone_kwargs, build_backbone
from dynammo.optim import OptimSettings
from dynammo.pretrain.augment import TwoViews, preset
from dynammo.pretrain.config import deviations, resolved_lrate, run_seed
from dynammo.pretrain.data import PretrainData, load_pretrain_data
from dynammo.pretrain.knn import feature_spread, feature_std, knn_accuracy
from dynammo.pretrain.models import MoCoV2, SimSiam
from dynammo.run.progress import versions
from dynammo.run.session import run_session
from dynammo.run.sinks.tensorboard import open_summary_writer
from dynammo.rundir import RunDir

PARTIAL, FINAL, BACKBONE_FILE, SUMMARY = "partial.pt", "final.pt", "backbone.pt", "pretrain.json"
CSV_FIELDS = ["epoch", "loss", "knn_acc", "feature_std", "feature_spread", "embed_spread", "seconds",
              "monitor_seconds"]
DEFAULT_QUEUE = 4096


def resolve_queue(cfg, n_images: int) -> int:
    """moco_queue as used: the given one (checked), else 4096 or about half the images, a multiple of
    batch_size."""
    b = cfg.batch_size
    if cfg.moco_queue is None:
        return max(b, (min(DEFAULT_QUEUE, n_images // 2) // b) * b)
    k = cfg.moco_queue
    if k < b:
        raise UserError(f"moco_queue={k} is smaller than batch_size={b}: the queue must hold at least one batch of "
                        f"keys; raise moco_queue (e.g. moco_queue={b * max(1, DEFAULT_QUEUE // b)}) or lower batch_size")
    if k % b:
        raise UserError(f"batch_size={b} does not divide moco_queue={k}: each batch's keys replace the oldest whole "
                        f"batch of the queue; use moco_queue={(k // b) * b or b} or a batch_size that divides {k}")
    return k


def backbone_state(backbone: torch.nn.Module) -> dict:
    """The backbone's weights as `pretrained: PATH` loads them: torchvision names for ResNets, timm
    names for the ViTs (without our `vit.` prefix)."""
    state = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()}
    if state and all(k.startswith("vit.") for k in state):
        state = {k[4:]: v for k, v in state.items()}
    return state


class _Images:
    """What backbone_kwargs reads of a scenario: the side of its training images."""

    def __init__(self, images: ImageSet):
        self.train = images


class Pretraining:
    """Everything a pretraining run needs, built before anything is written (every bad input fails here)."""

    def __init__(self, cfg, console: Console, device: Optional[str] = None):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("`dynammo pretrain` runs as one process; start it without torchrun")
        self.cfg = cfg
        self.console = console
        if launched_by_torchrun():
            raise UserError("dynammo pretrain trains on one process; launch it without torchrun")
        seed = run_seed(cfg)
        seed_everything(seed)
        dev = resolve_device(device or cfg.device)
        if cfg.batch_size < 2:
            raise UserError("batch_size=1: self-supervised pretraining compares the images of a batch (and BatchNorm "
                            "needs two); use batch_size >= 2")
        self.data: PretrainData = load_pretrain_data(cfg)
        n = len(self.data.images)
        if n < 2:
            raise UserError(f"only {n} image to pretrain on; give at least 2 (better thousands)")
        if cfg.ssl_method == "moco_v2":
            cfg["moco_queue"] = resolve_queue(cfg, n)
        cfg["lrate"] = resolved_lrate(cfg)
        self.engine = Engine(cfg, console, dev, seed)
        tf = BatchTransform(self.data.mean, self.data.std, channels_last=self.engine.compute.channels_last)
        self.engine.set_transforms(tf, tf)
        self.views = TwoViews(preset(cfg.ssl_augment, self.data.flip, cfg.ssl_crop_min), self.data.mean,
                              self.data.std, channels_last=self.engine.compute.channels_last)
        backbone = build_backbone(cfg.backbone, cfg.pretrained, **backbone_kwargs(cfg, _Images(self.data.images)))
        if cfg.ssl_method == "simsiam":
            self.model = SimSiam(backbone, cfg.simsiam_proj_dim, cfg.simsiam_proj_layers, cfg.simsiam_pred_dim,
                                 cfg.simsiam_stop_gradient, zero_init_residual=not cfg.pretrained)
        else:
            self.model = MoCoV2(backbone, cfg.moco_queue, cfg.moco_dim, cfg.moco_hidden_dim, cfg.moco_momentum,
                                cfg.moco_temperature, cfg.moco_bn_groups, torch.Generator().manual_seed(seed))
        self.engine.compute.prepare_module(self.model.to(dev))  # channels-last weights on that path
        self.params = self.model.trainable()
        self.settings = OptimSettings.from_config(cfg)
        self.n_batches = -(-n // cfg.batch_size)
        probe = self.data.knn.test if self.data.knn is not None else self.data.images
        self.probe = probe.subset(torch.randperm(len(probe), generator=torch.Generator().manual_seed(seed))
                                  [:cfg.ssl_probe_images].sort().values)
        # the state that is not a trained parameter (captured into partial checkpoints)
        self.step = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # on the device: no host sync per step
        self.seen = 0
        self.rows: List[dict] = []
        self._t0 = time.perf_counter()
        self.writer: Optional[RunDir] = None
        self.tb = None  # a SummaryWriter on tb/ (run)

    # ---- one training step ----
    def loss(self, batch: Batch):
        raw = batch.raw
        if len(raw) < 2:  # a last batch of one image: BatchNorm cannot train on it; a zero step
            return sum((p * 0).sum() for p in self.params), None, None
        x1, x2 = self.views(raw, self.engine.generator)
        loss, logits = self.model.loss(x1, x2, self.engine.generator)
        self.loss_sum += loss.detach().double() * len(raw)
        self.seen += len(raw)
        if logits is None:
            return loss, None, None
        return loss, logits, torch.zeros(len(raw), dtype=torch.long, device=logits.device)

    def after_step(self) -> None:
        if isinstance(self.model, MoCoV2):
            self.model.after_step()
        self.step += 1
        if self.step % self.n_batches == 0:
            self.end_epoch(self.step // self.n_batches)

    # ---- the monitor ----
    @torch.no_grad()
    def monitor(self, with_knn: bool) -> dict:
        self.model.eval()
        try:
            batch = self.cfg.eval_batch_size  # the monitor only measures: nothing here feeds training
            probe = self.engine.apply(self.model.probe, self.probe, batch_size=batch)
            feats = probe["feature"]
            out = {"feature_std": feature_std(feats), "feature_spread": feature_spread(feats),
                   "embed_spread": feature_spread(probe["embed"]), "knn_acc": None}
            knn = self.data.knn
            if with_knn and knn is not None:
                bank = self.engine.apply(self.model.backbone, knn.bank, batch_size=batch)
                test = self.engine.apply(self.model.backbone, knn.test, batch_size=batch)
                out["knn_acc"] = knn_accuracy(bank, knn.bank.labels, test, knn.test.labels, self.cfg.knn_k,
                                              knn.num_classes, self.cfg.knn_vote, self.cfg.knn_temperature)
        finally:
            self.model.train()
        return out

    def end_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        seconds = time.perf_counter() - self._t0
        t1 = time.perf_counter()
        due = epoch == cfg.epochs or (cfg.knn_every and epoch % cfg.knn_every == 0)
        m = self.monitor(bool(due))
        row = {"epoch": epoch, "loss": float(self.loss_sum) / max(self.seen, 1), **m,
               "seconds": round(seconds, 3), "monitor_seconds": round(time.perf_counter() - t1, 3)}
        self.rows.append(row)
        self.loss_sum.zero_()
        self.seen = 0
        knn_txt = f", k-NN {row['knn_acc']:.2f}%" if row["knn_acc"] is not None else ""
        self.console.print(f"pretrain epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f}{knn_txt}, feature spread "
                           f"{row['feature_spread']:.4f} (std {row['feature_std']:.5f}), embedding spread "
                           f"{row['embed_spread']:.4f}")
        if self.writer is not None:
            self.write_rows()
            tb = self.tb
            if tb is not None:
                for key in ("loss", "knn_acc", "feature_spread", "embed_spread"):
                    if row[key] is not None:
                        tb.add_scalar(f"pretrain/{key}", row[key], epoch)
                tb.flush()
        self._t0 = time.perf_counter()
        threshold = cfg.ssl_collapse_std
        for key, what in (("feature_spread", "backbone features"), ("embed_spread", "embeddings")):
            if threshold > 0 and row[key] < threshold:
                raise UserError(f"the representation collapsed after epoch {epoch}: the std of the l2-normalised {what} "
                                f"is {row[key]:.4f} x 1/sqrt(dim), below ssl_collapse_std={threshold}; lower lrate, check "
                                "the augmentation (ssl_augment) or try the other ssl_method")

    # ---- state for exact resumption ----
    def capture(self) -> dict:
        return {"buffers": {k: v.detach().cpu().clone() for k, v in self.model.named_buffers()},
                "frozen": {k: p.detach().cpu().clone() for k, p in self.model.named_parameters() if not p.requires_grad},
                "step": self.step, "loss_sum": self.loss_sum.cpu().clone(), "seen": self.seen,
                "rows": copy.deepcopy(self.rows)}

    def restore(self, state: dict) -> None:
        buffers = dict(self.model.named_buffers())
        frozen = {k: p for k, p in self.model.named_parameters() if not p.requires_grad}
        if set(buffers) != set(state["buffers"]) or set(frozen) != set(state["frozen"]):
            raise UserError("the partial checkpoint does not match the networks this pretraining builds; delete "
                            "checkpoints/partial.pt to start the pretraining again")
        with torch.no_grad():
            for k, v in state["buffers"].items():
                buffers[k].copy_(v.to(buffers[k].device))
            for k, v in state["frozen"].items():
                frozen[k].copy_(v.to(frozen[k].device))
        self.step, self.seen = int(state["step"]), int(state["seen"])
        self.loss_sum = state["loss_sum"].to(self.engine.device).clone()
        self.rows = copy.deepcopy(state["rows"])

    # ---- outputs ----
    def write_rows(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.writer.dir / "metrics.csv", buf.getvalue())

    def summary(self, status: str, **extra) -> dict:
        cfg, data = self.cfg, self.data
        last = self.rows[-1] if self.rows else {}
        knn_rows = [r for r in self.rows if r.get("knn_acc") is not None]
        return {
            "kind": "pretrain", "ssl_method": cfg.ssl_method, "backbone": cfg.backbone, "seed": run_seed(cfg),
            "status": status, "dataset": None if cfg.ssl_folder else cfg.dataset, "ssl_folder": cfg.ssl_folder,
            "images": {"count": len(data.images), "description": data.description, "selection": data.selection,
                       "list": "images.csv"},
            "normalization": {"mean": list(data.mean), "std": list(data.std)},
            "augment": {"preset": cfg.ssl_augment, **asdict(self.views.spec)},
            "knn": None if data.knn is None else {"split": data.knn.description, "k": min(cfg.knn_k, len(data.knn.bank)),
                                                  "vote": cfg.knn_vote, "temperature": cfg.knn_temperature},
            "epochs_done": len(self.rows), "epochs": cfg.epochs, "rows": self.rows,
            "final_knn_acc": knn_rows[-1]["knn_acc"] if knn_rows and knn_rows[-1] is last else None,
            "final_feature_spread": last.get("feature_spread"), "final_loss": last.get("loss"),
            "pretrain_seconds": round(sum(r["seconds"] + r["monitor_seconds"] for r in self.rows), 3),
            "backbone_file": BACKBONE_FILE if status == "complete" else None,
            "compute": self.engine.compute.record(), "deviations": deviations(cfg), "versions": versions(), **extra,
        }

    def write_images(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "class", "sha1"])
        w.writerows(self.data.records)
        write_text_atomic(self.writer.dir / "images.csv", buf.getvalue())

    def plot(self) -> None:
        if not self.cfg.plots or not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        axes[0].plot(epochs, [r["loss"] for r in self.rows], "o-")
        axes[0].set_title(f"{self.cfg.ssl_method} loss", fontsize=10)
        knn = [(r["epoch"], r["knn_acc"]) for r in self.rows if r["knn_acc"] is not None]
        if knn:
            axes[1].plot(*zip(*knn), "s-")
        axes[1].set_title("k-NN accuracy (%)", fontsize=10)
        axes[2].plot(epochs, [r["feature_spread"] for r in self.rows], "^-", label="backbone")
        axes[2].plot(epochs, [r["embed_spread"] for r in self.rows], "v--", label="embedding")
        axes[2].axhline(self.cfg.ssl_collapse_std, color="red", lw=0.8, label="collapse threshold")
        axes[2].set_title("feature std x sqrt(dim)", fontsize=10)
        axes[2].legend(fontsize=7)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        write_bytes_atomic(self.writer.dir / "curves.png", buf.getvalue())

    # ---- the run ----
    def run(self, out: Path, partial: Optional[dict] = None, resume: bool = False) -> dict:
        cfg, engine, console = self.cfg, self.engine, self.console
        self.writer = writer = RunDir(out, cfg, resume=resume)
        if resume:
            writer.remove_stale_writes()
        self.tb = open_summary_writer(writer.dir) if cfg.tensorboard else None

        def save_partial(journal_state: dict) -> None:
            writer.save_partial({"kind": "pretrain_partial", "ssl_method": cfg.ssl_method, "backbone": cfg.backbone,
                                 "images": len(self.data.images), "journal": journal_state, "config": dict(cfg)})

        journal = FitJournal(self.capture, self.restore, save_partial)
        if partial is not None:
            journal.load(partial["journal"])

        def close(status: str) -> None:
            if status != "complete":
                self.plot()
            if self.tb is not None:
                self.tb.close()

        with run_session(writer.dir, console, engine, journal=journal, tb=self.tb, mark=self._mark, close=close,
                         resume_hint=lambda: f"its state is saved: continue with `dynammo pretrain --resume {writer.dir}`"
                         ) as session:
            engine.begin_task("pretrain")
            self.describe()
            if not resume:
                self.write_images()
            write_json_atomic(writer.dir / SUMMARY, self.summary("running"))
            self.model.train()
            self._t0 = time.perf_counter()
            with session.stop_on_signals():
                engine.fit(self.params, self.data.images, self.loss, self.settings, stage=cfg.ssl_method,
                           augment=False, after_step=self.after_step)
                save_partial(journal.state(None))  # the finished fit: a kill from here on resumes at its end
            self.write_rows()
            self.finish()
            engine.end_task()
            result = self.summary("complete")
            write_json_atomic(writer.dir / SUMMARY, result)
            writer.remove_partial()
            self.plot()
            knn_txt = f", k-NN accuracy {result['final_knn_acc']:.2f}%" if result["final_knn_acc"] is not None else ""
            console.print(f"pretraining done: {len(self.rows)} epochs in {result['pretrain_seconds']:.1f}s{knn_txt}, "
                          f"feature spread {result['final_feature_spread']:.4f}")
            console.print(f"backbone: {writer.dir / BACKBONE_FILE} (use it with pretrained={writer.dir / BACKBONE_FILE})")
            return result

    def _mark(self, status: str, reason: str) -> None:
        try:
            if self.rows:
                self.write_rows()
            write_json_atomic(self.writer.dir / SUMMARY, self.summary(status, stopped_because=reason))
        except UserError:
            pass  # a full disk: the previous pretrain.json is intact

    def describe(self) -> None:
        cfg, data, c = self.cfg, self.data, self.console
        c.print(f"pretrain {cfg.ssl_method} on {data.description}")
        c.print(f"backbone {cfg.backbone}, {cfg.epochs} epochs of {self.n_batches} batches of {cfg.batch_size}, "
                f"{cfg.opt_type} lrate {cfg.lrate:g}, {cfg.scheduler} schedule, device {self.engine.device}, seed "
                f"{run_seed(cfg)}" + (f", queue {cfg.moco_queue}" if cfg.ssl_method == "moco_v2" else ""))
        c.print(f"augmentation {cfg.ssl_augment}: {self.views.spec}")
        c.print(f"compute: {self.engine.compute.describe()}")
        if data.knn is not None:
            c.print(f"k-NN monitor ({cfg.knn_vote}, k={min(cfg.knn_k, len(data.knn.bank))}): {data.knn.description}")
        else:
            c.print("k-NN monitor: none (no labeled split; set knn_dataset=NAME for one)")
        for d in deviations(cfg):
            c.print(f"deviation: {d}")

    def finish(self) -> None:
        """backbone.pt and the final checkpoint."""
        d = self.writer.dir
        save_torch_atomic(d / "checkpoints" / FINAL, {
            "kind": "pretrain", "ssl_method": self.cfg.ssl_method, "backbone": self.cfg.backbone,
            "state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.engine.last_optimizer_state, "rng": rng_state(self.engine.generator),
            "rows": self.rows, "config": dict(self.cfg)})
        save_torch_atomic(d / BACKBONE_FILE, backbone_state(self.model.backbone))
