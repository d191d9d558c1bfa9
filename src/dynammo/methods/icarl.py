"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017).

- Memory: herding selection on L2-normalised features (`sampling_method: herding`), a fixed total
  budget split evenly over the seen classes (see `data/memory.py`).
- Training (every task): the task's data + the memory, with a frozen copy of the network taken at
  the start of the task as the teacher for the old classes. Two losses (`distill_loss`):
  - `kd` (default, the reference framework's): CE over all seen classes + KD with temperature T
    (default 2) on the old classes' logits (`methods/distill.py`);
  - `bce` (the paper's): binary cross-entropy with logits on every seen class, whose targets are
    one-hot for the new labels and sigmoid(old model's logits) for the old classes.
- Classifiers: the paper classifies by nearest-mean-of-exemplars (NME), so with
  `icarl_classifier: nme` (the default) NME is the headline (`acc`, `avg_acc`, forgetting, MCR,
  summary.json) and the CNN head is reported beside it with the same metrics under `extra.cnn`;
  `icarl_classifier: cnn` swaps them (the headline is the CNN head, NME under `extra.nme`). After the memory is updated at the end of every task,
  each class's mean is the mean of its exemplars' L2-normalised features, L2-normalised again; a
  test image goes to the class whose mean is nearest to its L2-normalised feature. `nme_flip: true`
  also averages in the features of the horizontally flipped exemplars (the paper's code; off in the
  reference). The means are kept with the model (checkpoints hold them), so a reloaded checkpoint
  gives the same NME predictions without recomputing anything.
- Confidence of the NME classifier: the paper's NME has none, so its class probabilities are those
  of prototypical networks (Snell et al., NeurIPS 2017): softmax over the classes of
  -|| f/|f| - mu_c ||^2 / T, T = `nme_temperature` (default 1, Snell et al.'s; no prediction depends
  on it). With NME the headline, its ECE, its open-set score (the max of these probabilities) and the
  confidence of `dynammo export` are the NME's, not the CNN head's.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.config import Option
from dynammo.data.memory import ExemplarMemory, at_least_float32
from dynammo.data.scenario import Task
from dynammo.methods import METHODS
from dynammo.methods.distill import DistillMethod, kd_options


def nme_scores(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance || f / |f| - mu_c ||^2 to each class mean (rows): higher is nearer.

    The squared distance is expanded as |f|^2 - 2 f.mu + |mu|^2 (one matmul; unlike torch.cdist it
    has no batch-size-dependent code path, so `dynammo export` can trace it for any batch)."""
    f = F.normalize(at_least_float32(features), dim=1)
    mu = class_means.to(f.device, f.dtype)
    return -(f.pow(2).sum(1, keepdim=True) - 2 * f @ mu.t() + mu.pow(2).sum(1).unsqueeze(0))


def nme_predict(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """Nearest mean of exemplars: argmin_c || f / |f| - mu_c ||^2."""
    return nme_scores(features, class_means).argmax(dim=1)


def class_means_of(memory: ExemplarMemory, features_fn, n_classes: int, flip_fn=None) -> torch.Tensor:
    """(n_classes, d): for each class, the L2-normalised mean of its exemplars' L2-normalised
    features (averaged with those of the flipped exemplars when flip_fn is given)."""
    means: Dict[int, torch.Tensor] = {}
    for c, exemplars in memory.per_class.items():
        f = F.normalize(at_least_float32(features_fn(exemplars)), dim=1)
        mean = f.mean(0)
        if flip_fn is not None:
            mean = (mean + F.normalize(at_least_float32(flip_fn(exemplars)), dim=1).mean(0)) / 2
        means[c] = F.normalize(mean, dim=0)
    missing = [c for c in range(n_classes) if c not in means]
    if missing:
        raise ValueError(f"NME: classes {missing} have no exemplar in memory")
    return torch.stack([means[c] for c in range(n_classes)])


@METHODS.register("icarl", aliases=("icarl_il", "icarl_cil"))
class ICaRL(DistillMethod):
    summary = "herding memory + distillation of the old logits, CNN and nearest-mean-of-exemplars (NME) classifiers (CVPR 2017)"
    options = {
        **kd_options(),
        "distill_loss": Option("str", "kd", "kd: CE + KD(T) on the old logits (the reference) | bce: sigmoid BCE "
                                            "with the old model's sigmoid outputs as old-class targets (the paper)",
                               choices=("kd", "bce")),
        "nme_flip": Option("bool", False, "NME class means also average the flipped exemplars' features"),
        "nme_temperature": Option("float", 1.0, "temperature T of the NME classifier's probabilities "
                                                "softmax(-||f/|f| - mu_c||^2 / T), its confidence for ECE, "
                                                "open-set and export (predictions do not depend on it)",
                                  min=0.0, min_open=True),
        "icarl_classifier": Option("str", "nme", "the headline classifier: nme (nearest mean of exemplars, the "
                                                 "paper) | cnn (the trained head); the other one is reported beside "
                                                 "it under extra", choices=("nme", "cnn"), faithful="nme"),
    }

    def __init__(self, cfg, engine, scenario):
        super().__init__(cfg, engine, scenario)
        self.class_means: Optional[torch.Tensor] = None  # (n_seen, d), on the CPU

    @classmethod
    def deviations(cls, cfg) -> List[str]:
        out = super().deviations(cfg)
        if cfg.distill_loss == "kd":
            out.append(f"distillation: CE + KD(T={cfg.T:g}) on the old logits, the reference framework's "
                       "(the paper: sigmoid BCE with the old model's outputs as targets; distill_loss=bce)")
        if not cfg.nme_flip:
            out.append("NME class means without the flipped exemplars (the reference; the paper's code adds them; "
                       "nme_flip=true)")
        return out

    @classmethod
    def headline_record(cls, cfg) -> Dict[str, str]:
        if cfg.icarl_classifier == "cnn":
            return super().headline_record(cfg) | {"classifier": "cnn"}
        return {"classifier": "nme", "confidence": f"softmax(-||f/|f| - mu_c||^2 / T), T={cfg.nme_temperature:g}, "
                                                   "at the predicted class"}

    # ---- training ----
    def step(self, batch: Batch):
        if self.cfg.distill_loss == "kd":
            return super().step(batch)
        logits = self.net(batch.x)
        wide = at_least_float32(logits)  # the loss in float32 under autocast
        targets = F.one_hot(batch.y, logits.shape[1]).to(wide.dtype)
        if self.old_net is not None:
            targets[:, : self.known] = torch.sigmoid(self.old_logits(batch.x).to(wide.dtype))
        return F.binary_cross_entropy_with_logits(wide, targets), logits, batch.y

    def end_task(self, task: Task) -> None:
        super().end_task(task)  # memory update (herding), then the class means from the new memory
        self.update_class_means()

    def update_class_means(self) -> None:
        self.eval_mode()
        flip = None
        if self.cfg.nme_flip:
            flip = lambda data: self.engine.apply(lambda x: self.net.features(x.flip(-1)), data)  # noqa: E731
        self.class_means = class_means_of(self.memory, self.features, self.total, flip)

    # ---- inference ----
    def predict(self, x: torch.Tensor) -> dict:
        feats = self.net.features(x)
        logits = self.net.head(feats)
        if self.class_means is None:  # before the first memory update (structure-only cost accounting)
            return {"logits": logits}
        scores = nme_scores(feats, self.class_means)
        if self.cfg.icarl_classifier == "cnn":
            return {"logits": logits, "pred_nme": scores.argmax(1)}
        # NME is the headline, with its own probabilities; its task-IL prediction is the nearest mean
        # within the task's classes
        return {"logits": logits, "pred": scores.argmax(1), "task_il_logits": scores, "pred_cnn": logits.argmax(1),
                "probs": torch.softmax(scores / self.cfg.nme_temperature, dim=1)}

    def grow(self, task: Task) -> None:
        """Structure without data: placeholder class means, so `dynammo cost` runs the NME step too."""
        super().grow(task)
        if self.class_means is None or len(self.class_means) < self.total:
            self.class_means = torch.zeros(self.total, self.net.backbone.out_dim)

    # ---- checkpoints ----
    def extra_state(self) -> dict:
        return {"class_means": self.class_means}

    def load_extra_state(self, state: dict) -> None:
        self.class_means = state.get("class_means")
