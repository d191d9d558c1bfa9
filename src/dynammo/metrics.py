"""Continual-learning metrics (accuracies in percent). No method may override these, so numbers
compare across methods.

a = acc_matrix, a[j][i] = accuracy on task i's classes after training task j (None for i > j).
- acc[j]: accuracy on all test samples of the classes seen up to task j (sample-weighted)
- avg_acc: mean of acc (average incremental accuracy, Rebuffi et al. 2017); last_acc = acc[-1]
- forgetting (Chaudhry et al. 2018): mean over i < T-1 of max_{i<=j<=T-2} a[j][i] - a[T-1][i]
- bwt (Lopez-Paz & Ranzato 2017): mean over i < T-1 of a[T-1][i] - a[i][i]
- mcr[j]: mean over seen classes of per-class recall (balanced accuracy)
- task_il_acc[j]: accuracy when the task id is given
- acc_task_mean[j]: mean over the tasks i <= j of a[j][i] (each task weighs the same, however many
  test images it has): the "average accuracy" of L2P, DualPrompt and CODA-Prompt's code, which
  differs from acc on ImageNet-R's unequal classes; avg_/last_acc_task_mean as for acc
acc, mcr, ece and openset are the headline classifier's (results.json `classifier`, `confidence`).
A metric of no test images is undefined: None (null in results.json) with the reason under
`undefined`, never NaN; the means above skip it.
- ece[j]: expected calibration error (15 bins) of the predictions on the seen classes' test images
- openset.auroc/fpr95/aupr/aupr_out[j]: how well the known-score separates the seen classes' test
  images (positive) from those of the classes not learned yet (None after the last task)
Formulas of the last two: `openset.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(y_true, y_pred) -> Optional[float]:
    """Percent correct; None (undefined) for no samples."""
    y_true, y_pred = _np(y_true), _np(y_pred)
    return float(100.0 * (y_true == y_pred).mean()) if len(y_true) else None


def mean_class_recall(y_true, y_pred, classes: Optional[Sequence[int]] = None) -> Optional[float]:
    """Mean over the classes that have samples of their recall; None (undefined) when none has."""
    y_true, y_pred = _np(y_true), _np(y_pred)
    classes = np.unique(y_true) if classes is None else classes
    recalls = [(y_pred[y_true == c] == c).mean() for c in classes if (y_true == c).any()]
    return float(100.0 * np.mean(recalls)) if recalls else None


def mean_defined(values) -> Optional[float]:
    """The mean of the values that are defined (not None); None when none is."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[t][p] = number of samples of class t predicted as p."""
    y_true, y_pred = _np(y_true).astype(np.int64), _np(y_pred).astype(np.int64)
    # a prediction of a class not yet seen is still counted (as its own column)
    num_classes = max(num_classes, int(y_pred.max()) + 1 if len(y_pred) else 0, int(y_true.max()) + 1 if len(y_true) else 0)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def forgetting(a: List[List[Optional[float]]]) -> Optional[float]:
    """Over the tasks whose accuracies are defined (a task without test images has none)."""
    T = len(a)
    if T < 2:
        return None
    terms = []
    for i in range(T - 1):
        before = [a[j][i] for j in range(i, T - 1) if a[j][i] is not None]
        if before and a[T - 1][i] is not None:
            terms.append(max(before) - a[T - 1][i])
    return mean_defined(terms)


def bwt(a: List[List[Optional[float]]]) -> Optional[float]:
    T = len(a)
    if T < 2:
        return None
    return mean_defined([a[T - 1][i] - a[i][i] for i in range(T - 1) if a[T - 1][i] is not None
                         and a[i][i] is not None])


def task_mean_accuracy(a: List[List[Optional[float]]]) -> List[Optional[float]]:
    """acc_task_mean[j] = mean over the tasks i <= j whose accuracy is defined of a[j][i]."""
    return [mean_defined(row[: j + 1]) for j, row in enumerate(a)]


def task_il_predictions(scores: torch.Tensor, y_true: torch.Tensor, bounds: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """argmax of each sample's scores restricted to the classes of its own (true) task."""
    pred = torch.empty_like(y_true)
    for start, end in bounds:
        mask = (y_true >= start) & (y_true < end)
        if mask.any():
            pred[mask] = scores[mask][:, start:end].argmax(1) + start
    return pred


class ContinualMetrics:
    """Collects the evaluation after each task and derives every summary metric."""

    def __init__(self, bounds: Sequence[Tuple[int, int]]):
        self.bounds = list(bounds)
        self.acc_matrix: List[List[Optional[float]]] = []
        self.acc: List[float] = []
        self.mcr: List[float] = []
        self.task_il_acc: List[float] = []
        # extra classifiers (iCaRL's CNN head beside its NME): the same metrics, each its own set
        self.extra: Dict[str, "ContinualMetrics"] = {}
        self.last_confusion: Optional[np.ndarray] = None
        # calibration and open-set detection (percent), one entry per evaluated task
        self.ece: List[Optional[float]] = []
        self.openset: List[Optional[dict]] = []  # {auroc, fpr95, aupr, aupr_out, n_known, n_unknown} or None
        self.openset_score: Optional[str] = None  # the score's name; None: open-set evaluation is off
        # the classifier acc, mcr, ece and openset belong to, and its confidence (Method.headline_record)
        self.headline: Optional[Dict[str, str]] = None
        self.undefined: Dict[str, str] = {}  # results.json path of a None metric -> why it is undefined

    def add(self, j: int, y_true, y_pred, y_pred_task_il=None, extra_preds: Optional[dict] = None) -> None:
        y_true, y_pred = _np(y_true), _np(y_pred)
        row: List[Optional[float]] = []
        for i, (start, end) in enumerate(self.bounds):
            if i > j:
                row.append(None)
                continue
            mask = (y_true >= start) & (y_true < end)
            row.append(accuracy(y_true[mask], y_pred[mask]))
            if row[-1] is None:
                self.undefined[f"acc_matrix[{j}][{i}]"] = f"task {i + 1}'s classes have no test images"
        self.acc_matrix.append(row)
        seen_end = self.bounds[j][1]
        self.acc.append(accuracy(y_true, y_pred))
        self.mcr.append(mean_class_recall(y_true, y_pred, range(seen_end)))
        if self.acc[-1] is None:
            for name in ("acc", "mcr") + (("task_il_acc",) if y_pred_task_il is not None else ()):
                self.undefined[f"{name}[{j}]"] = f"the classes seen after task {j + 1} have no test images"
        if y_pred_task_il is not None:
            self.task_il_acc.append(accuracy(y_true, y_pred_task_il))
        for name, pred in (extra_preds or {}).items():
            self.extra.setdefault(name, ContinualMetrics(self.bounds)).add(j, y_true, pred)
        self.last_confusion = confusion_matrix(y_true, y_pred, seen_end)

    def add_scores(self, ece: Optional[float], openset: Optional[dict]) -> None:
        """The calibration error and the open-set metrics (or None) of the task just added."""
        # a run resumed from a checkpoint written before these metrics existed: None for its tasks
        missing = len(self.acc) - 1 - len(self.ece)
        j = len(self.acc) - 1
        if ece is not None and not math.isfinite(ece):
            ece = None
            self.undefined[f"ece[{j}]"] = "the model's confidences are not finite numbers (a diverged training?)"
        for key, value in list((openset or {}).items()):
            if isinstance(value, float) and not math.isfinite(value):
                openset[key] = None
                self.undefined[f"openset.{key}[{j}]"] = "the known-scores are not finite numbers (a diverged training?)"
        self.ece += [None] * missing + [ece]
        self.openset += [None] * missing + [openset]

    def state_dict(self) -> dict:
        return {"acc_matrix": self.acc_matrix, "acc": self.acc, "mcr": self.mcr, "task_il_acc": self.task_il_acc,
                "extra": {name: m.state_dict() for name, m in self.extra.items()},
                "last_confusion": None if self.last_confusion is None else self.last_confusion.tolist(),
                "ece": self.ece, "openset": self.openset, "openset_score": self.openset_score,
                "headline": self.headline, "undefined": self.undefined}

    def load_state_dict(self, state: dict) -> None:
        self.acc_matrix, self.acc, self.mcr = state["acc_matrix"], state["acc"], state["mcr"]
        self.task_il_acc = state["task_il_acc"]
        self.extra = {}
        for name, sub in state["extra"].items():
            self.extra[name] = ContinualMetrics(self.bounds)
            self.extra[name].load_state_dict(sub)
        conf = state["last_confusion"]
        self.last_confusion = None if conf is None else np.asarray(conf, dtype=np.int64)
        # absent from checkpoints written before these metrics existed (add_scores pads them)
        self.ece, self.openset = list(state.get("ece", [])), list(state.get("openset", []))
        self.openset_score = state.get("openset_score", self.openset_score)
        self.headline = state.get("headline") or self.headline  # absent before it was recorded
        self.undefined = dict(state.get("undefined") or {})

    def summary(self) -> dict:
        task_mean = task_mean_accuracy(self.acc_matrix)
        out = {
            **(dict(self.headline) if self.headline else {}),
            "acc_matrix": self.acc_matrix,
            "acc": self.acc,
            "acc_task_mean": task_mean,
            "mcr": self.mcr,
            "task_il_acc": self.task_il_acc or None,
            "avg_acc": mean_defined(self.acc),
            "last_acc": self.acc[-1] if self.acc else None,
            "avg_acc_task_mean": mean_defined(task_mean),
            "last_acc_task_mean": task_mean[-1] if task_mean else None,
            "avg_mcr": mean_defined(self.mcr),
            "last_mcr": self.mcr[-1] if self.mcr else None,
            "forgetting": forgetting(self.acc_matrix),
            "bwt": bwt(self.acc_matrix),
        }
        if self.extra:
            out["extra"] = {name: {k: v for k, v in m.summary().items() if k != "task_il_acc"}
                            for name, m in self.extra.items()}
        if self.ece:  # the extra classifiers have none: their predictions come without a confidence
            out.update(self.calibration_summary())
            out["openset"] = self.openset_summary()
        undefined = dict(self.undefined)
        undefined.update({f"acc_task_mean[{j}]": f"no task seen after task {j + 1} has test images"
                          for j, v in enumerate(task_mean) if v is None})
        if undefined:
            out["undefined"] = undefined
        return out

    def calibration_summary(self) -> dict:
        known = [e for e in self.ece if e is not None]
        return {"ece": self.ece, "avg_ece": float(np.mean(known)) if known else None,
                "last_ece": self.ece[-1] if self.ece else None}

    def openset_summary(self) -> Optional[dict]:
        """Per task lists (None where no class is left unseen) and their means over the tasks that
        have a value; None when open-set evaluation is off."""
        if self.openset_score is None:
            return None
        out: dict = {"score": self.openset_score, "positive": "known"}
        if self.headline:
            out["classifier"] = self.headline["classifier"]
        for key in OPENSET_KEYS:
            out[key] = [None if o is None else o[key] for o in self.openset]
        for key in ("n_known", "n_unknown"):
            out[key] = [None if o is None else o[key] for o in self.openset]
        for key in OPENSET_KEYS:
            vals = [v for v in out[key] if v is not None]
            out[f"avg_{key}"] = float(np.mean(vals)) if vals else None
        return out


OPENSET_KEYS = ("auroc", "fpr95", "aupr", "aupr_out")
# a run's single numbers: summary.json's means over seeds, MLflow's final metrics
SUMMARY_KEYS = ("avg_acc", "last_acc", "avg_acc_task_mean", "last_acc_task_mean", "avg_mcr", "last_mcr", "forgetting",
                "bwt", "avg_ece", "last_ece")


@dataclass(frozen=True)
class Stat:
    mean: float
    std: Optional[float]  # None for one value
    n: int
    values: Tuple[float, ...]


def mean_std(values: Sequence[Optional[float]]) -> Optional[Stat]:
    """Mean and sample std (ddof=1, as papers report) of the values that are not None; None when
    there is none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if len(set(vals)) == 1:  # exactly the mean, no rounding noise in the std
        return Stat(vals[0], 0.0 if len(vals) > 1 else None, len(vals), tuple(vals))
    return Stat(float(np.mean(vals)), float(np.std(vals, ddof=1)), len(vals), tuple(vals))
