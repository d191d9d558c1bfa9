"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023).

- Phase 1 (optional, `ranpac_adapt`, the paper's default on): the pretrained model is adapted on
  the first task only, with a linear head and cross-entropy, then frozen for good
  (methods/first_task.py: `adapter`, on a CNN ACL's residual stage adapters where the paper uses
  AdaptFormer's ViT adapter, a recorded deviation; `finetune`; `none`).
- Phase 2: a frozen random projection W_rand (D x M, entries N(0, 1), drawn once after phase 1) and
  a ReLU: h = ReLU(f(x) W_rand), M = `ranpac_m` (the paper's 10,000; 0: no projection, h = f(x)).
- After each task the class sums Q = sum h y^T (M x classes, y one-hot) and the Gram matrix
  G = sum h h^T (M x M) of the task's training images (test transform) are added to the running
  totals, and the classifier is the ridge regression W = (G + lambda I)^-1 Q; logits = h W.
  Inference: one backbone pass, then two matrix products in float64 (the projection and the head
  are float64 weights, which autocast leaves alone: a bf16 ridge head would lose its cancellations).
- lambda is chosen per task as the paper's code does: the current task's images are split 80/20
  (`ranpac_val_fraction`; a seeded permutation here, the code's shuffled loader order there), the
  ridge is fitted on the 80% part alone for every lambda of the grid 10^-8 .. 10^8
  (`ranpac_lambdas`), and the lambda with the lowest mean squared error of the one-hot targets on
  the 20% part wins (`ranpac_ridge_criterion: mse`; `accuracy` takes the highest validation
  accuracy instead, the first of the grid on ties). The grid search uses one eigendecomposition of
  the 80% part's Gram matrix for all lambdas; the final W is one linear solve.
- G and Q are accumulated and solved in float64 on the CPU (the paper's code: float32), so the
  result does not depend on the order of the tasks' sums beyond float64 rounding. They are kept
  between tasks (in every task checkpoint: 8 (M^2 + M C) bytes, 800 MB for G at M = 10,000), reported
  in `cost` as `statistics_bytes`; a projection size whose statistics and their solve would not fit
  in the free memory is refused before the run starts.
- No exemplar memory.

Without pretrained weights the backbone is first trained on task 1 and frozen (methods/frozen.py),
then phase 1 adapts it: a recorded deviation.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.config import Option
from dynammo.data.scenario import Task
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.methods.first_task import (CNN_ADAPTER_DEVIATION, LAYER_NAMES, TunedBackbone, adapt_on_first_task,
                                        check_adaptation)
from dynammo.methods.frozen import (BACKBONE_EPOCHS, FrozenBackboneNet, check_backbone_can_train,
                                    train_backbone_then_freeze)
from dynammo.models.backbones import backbone_kwargs, build_backbone

PAPER_LAMBDAS = [10.0 ** k for k in range(-8, 9)]
CHUNK = 1024  # images projected at a time when accumulating the statistics


def ridge_solution(gram: torch.Tensor, class_sums: torch.Tensor, lam: float) -> torch.Tensor:
    """W = (G + lambda I)^-1 Q, in the dtype of G."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, class_sums)


def validation_scores(h_fit: torch.Tensor, y_fit: torch.Tensor, h_val: torch.Tensor, y_val: torch.Tensor,
                      lambdas: Sequence[float], n_classes: int) -> dict:
    """Per lambda, the ridge fitted on (h_fit, y_fit) scored on (h_val, y_val): {"mse": [...],
    "accuracy": [...] (percent)}. One eigendecomposition of the M x M Gram matrix G = H^T H =
    V diag(e) V^T serves every lambda: W(lambda) = V diag(1 / (e + lambda)) V^T Q. (The N x N kernel
    matrix would be cheaper with fewer images than M, but it stays well conditioned where the final
    M x M solve does not: the search must see the same conditioning as the W it selects for.)"""
    h_fit, h_val = h_fit.double(), h_val.double()
    onehot_fit = F.one_hot(y_fit, n_classes).double()
    onehot_val = F.one_hot(y_val, n_classes).double()
    e, v = torch.linalg.eigh(h_fit.T @ h_fit)
    a, b = v.T @ (h_fit.T @ onehot_fit), h_val @ v
    mse, acc = [], []
    for lam in lambdas:
        pred = b @ (a / (e + lam)[:, None])
        mse.append(float(((pred - onehot_val) ** 2).mean()))
        acc.append(100.0 * float((pred.argmax(1) == y_val).double().mean()))
    return {"mse": mse, "accuracy": acc}


def choose_lambda(scores: dict, lambdas: Sequence[float], criterion: str) -> float:
    """The lowest validation MSE (the paper's code), or the highest accuracy; the first on ties."""
    values = scores[criterion]
    best = min(values) if criterion == "mse" else max(values)
    return lambdas[values.index(best)]


def available_memory_bytes() -> Optional[int]:
    """Memory the run may still allocate (Linux MemAvailable, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def statistics_bytes(width: int, n_classes: int) -> int:
    """Bytes of the float64 G (width x width) and Q (width x n_classes) kept between tasks."""
    return 8 * (width * width + width * n_classes)


def peak_bytes(width: int, n_classes: int) -> int:
    """Peak of the statistics and their solves: G and Q, plus the grid search's Gram matrix of the
    80% part, its eigenvectors and the eigensolver's workspace, then the final solve's copy of G."""
    return statistics_bytes(width, n_classes) + 8 * 4 * width * width


class RanPACNet(FrozenBackboneNet):
    """Encoder (the backbone, adapted on task 1 or not), frozen random projection + ReLU, ridge head."""

    def __init__(self, backbone: nn.Module, tuned: Optional[TunedBackbone], m: int):
        super().__init__(backbone)
        self.tuned = tuned
        d = backbone.out_dim
        # frozen weights of the model (counted in params_total), float64 as the statistics they come from;
        # drawn after phase 1, loaded from checkpoints
        self.projection = nn.Parameter(torch.zeros(d, m, dtype=torch.float64), requires_grad=False) if m > 0 else None
        self.width = m if m > 0 else d
        self.head = nn.Parameter(torch.zeros(0, self.width, dtype=torch.float64), requires_grad=False)  # W^T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.tuned(x) if self.tuned is not None else self.backbone(x)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """h of float64 features f."""
        return F.relu(f @ self.projection) if self.projection is not None else f

    def add_classes(self, n: int) -> None:
        old = self.head.data
        self.head = nn.Parameter(torch.cat([old, old.new_zeros(n, self.width)]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 from the feature on: autocast leaves float64 alone, so the ridge head never runs in bf16
        return F.linear(self.project(self.encode(x).double()), self.head)


@METHODS.register("ranpac", aliases=("random_projection",))
class RanPAC(Method):
    summary = ("first-task adaptation, frozen random projection to M dims + ReLU, ridge-regression head from "
               "accumulated float64 class sums and Gram matrix (McDonnell et al., NeurIPS 2023); one backbone pass")
    options = {
        "ranpac_adapt": Option("str", "adapter", "phase 1, task 1 only: adapter (on a CNN: ACL's stage adapters) | "
                                                 "finetune | none", choices=("adapter", "finetune", "none"),
                               faithful="adapter"),
        "ranpac_m": Option("int", 10000, "random projection size M (0: no projection, the ridge on the features)",
                           min=0, faithful=10000),
        "ranpac_lambdas": Option("float_list", PAPER_LAMBDAS, "the ridge parameters searched after each task",
                                 min=0.0, min_open=True, nonempty=True, faithful=PAPER_LAMBDAS),
        "ranpac_val_fraction": Option("float", 0.2, "share of the task's images that scores each lambda",
                                      min=0.0, max=1.0, min_open=True, max_open=True, faithful=0.2),
        "ranpac_ridge_criterion": Option("str", "mse", "lambda with the lowest validation MSE of the one-hot targets "
                                                       "(the paper's code) | the highest validation accuracy",
                                         choices=("mse", "accuracy"), faithful="mse"),
        "layer_names": LAYER_NAMES,
        "backbone_epochs": BACKBONE_EPOCHS,
    }
    paper_backbone = "an ImageNet-pretrained ViT-B/16"

    @classmethod
    def check_config(cls, cfg, num_classes: int) -> None:
        super().check_config(cfg, num_classes)
        check_backbone_can_train(cfg, num_classes)
        check_adaptation(cfg, num_classes, cfg.ranpac_adapt, "ranpac_adapt")
        width = cfg.ranpac_m
        if width == 0:
            with torch.random.fork_rng(devices=[]):  # a throw-away backbone: leave the seeded RNG as it was
                width = build_backbone(cfg.backbone, **backbone_kwargs(cfg)).out_dim
        need, free = peak_bytes(width, num_classes), available_memory_bytes()
        if free is not None and need > free:
            raise UserError(f"ranpac_m={cfg.ranpac_m} needs about {need / 2**30:.1f} GiB for its float64 "
                            f"{width} x {width} Gram matrix and its solves, but only {free / 2**30:.1f} GiB of memory "
                            f"is free; lower ranpac_m (the memory grows as its square)")

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        out = super().deviations(cfg)
        if cfg.ranpac_adapt == "adapter":
            out.append(CNN_ADAPTER_DEVIATION)
        return out

    def __init__(self, cfg, engine, scenario):
        super().__init__(cfg, engine, scenario)
        self.gram: Optional[torch.Tensor] = None  # G, float64 on the CPU
        self.class_sums: Optional[torch.Tensor] = None  # Q, float64 on the CPU
        self.lambdas: List[float] = []  # the lambda chosen after each task

    # ---- model ----
    def build_network(self) -> RanPACNet:
        cfg = self.cfg
        backbone = build_backbone(cfg.backbone, cfg.pretrained, **backbone_kwargs(cfg, self.scenario))
        tuned = None
        if cfg.ranpac_adapt != "none":  # RanPAC uses only the adapted model: fine-tune the backbone itself
            tuned = TunedBackbone(backbone, cfg.ranpac_adapt, copy_weights=False, layer_names=cfg.layer_names)
        net = RanPACNet(backbone, tuned, cfg.ranpac_m)
        if cfg.pretrained:
            net.freeze_backbone()
        return net

    def begin_task(self, task: Task) -> None:
        self.net.add_classes(task.size)
        self.net.to(self.device)

    def grow(self, task: Task) -> None:
        self.begin_task(task)
        if not self.net.backbone_frozen:
            self.net.freeze_backbone()
        if self.net.tuned is not None:
            self.net.tuned.freeze()

    # ---- training ----
    def train_task(self, task: Task) -> None:
        net = self.net
        if not net.backbone_frozen:
            train_backbone_then_freeze(self, task)
        if task.id == 0:
            if net.tuned is not None:
                adapt_on_first_task(self, task, net.tuned)
            if net.projection is not None:
                with torch.no_grad():
                    net.projection.copy_(torch.randn(net.projection.shape, generator=self.engine.generator).double())
        self.eval_mode()
        data = self.scenario.train_data(task)
        h = self.projected(self.engine.apply(net.encode, data))
        labels = data.labels
        self.accumulate(h, labels, task.end)
        lam = self.select_lambda(h, labels, task.end)
        self.lambdas.append(lam)
        w = ridge_solution(self.gram, self.class_sums, lam)
        with torch.no_grad():
            net.head.copy_(w.T.to(net.head.device))
        self.engine.console.print(f"{self.engine.task_label} ranpac: lambda {lam:g} ({self.cfg.ranpac_ridge_criterion} "
                                  f"on {self.cfg.ranpac_val_fraction:.0%} of the task's images)")

    @torch.no_grad()
    def projected(self, features: torch.Tensor) -> torch.Tensor:
        """h = ReLU(f W_rand) of CPU features, float64, computed on the device in chunks as inference does."""
        parts = [self.net.project(features[i: i + CHUNK].to(self.device).double()).cpu()
                 for i in range(0, len(features), CHUNK)]
        return torch.cat(parts)

    def accumulate(self, h: torch.Tensor, labels: torch.Tensor, n_seen: int) -> None:
        """G += H^T H and Q += H^T Y (Y one-hot over the n_seen classes), float64."""
        h64 = h.double()
        width = h64.shape[1]
        if self.gram is None:
            self.gram = torch.zeros(width, width, dtype=torch.float64)
            self.class_sums = torch.zeros(width, 0, dtype=torch.float64)
        grown = self.class_sums.new_zeros(width, n_seen)
        grown[:, : self.class_sums.shape[1]] = self.class_sums
        self.class_sums = grown
        self.gram += h64.T @ h64
        self.class_sums.index_add_(1, labels, h64.T)

    def select_lambda(self, h: torch.Tensor, labels: torch.Tensor, n_seen: int) -> float:
        """The paper's search on the current task's images: fit on a seeded 80%, score on the rest."""
        lambdas = list(self.cfg.ranpac_lambdas)
        if len(lambdas) == 1:
            return lambdas[0]
        order = torch.randperm(len(labels), generator=self.engine.generator)
        n_fit = int(len(labels) * (1.0 - self.cfg.ranpac_val_fraction))  # the paper's code: int(0.8 N)
        if not 0 < n_fit < len(labels):
            raise UserError(f"ranpac_val_fraction={self.cfg.ranpac_val_fraction} splits the task's {len(labels)} images "
                            "into an empty part; choose a fraction that leaves images on both sides")
        fit, val = order[:n_fit], order[n_fit:]
        scores = validation_scores(h[fit], labels[fit], h[val], labels[val], lambdas, n_seen)
        return choose_lambda(scores, lambdas, self.cfg.ranpac_ridge_criterion)

    # ---- inference ----
    def predict(self, x: torch.Tensor) -> dict:
        return {"logits": self.net(x)}

    def features(self, data):
        return self.engine.apply(self.net.encode, data)

    # ---- accounting and checkpoints ----
    def extra_cost(self) -> dict:
        return {"statistics_bytes": statistics_bytes(self.net.width, self.total)}

    def extra_state(self) -> dict:
        return {"gram": self.gram, "class_sums": self.class_sums, "lambdas": list(self.lambdas)}

    def load_extra_state(self, state: dict) -> None:
        self.gram, self.class_sums = state.get("gram"), state.get("class_sums")
        self.lambdas = list(state.get("lambdas", []))
