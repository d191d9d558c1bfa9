"""Open-set detection and calibration metrics, in plain numpy (no scikit-learn at run time).

Open-set detection after each task: the test images of the classes seen so far ("known") and of the
classes not learned yet ("unknown") each get a known-score, higher meaning "more likely a class the
model has learned". Known is the positive class throughout:

- auroc: the area under the ROC curve = P(score of a random known image > score of a random unknown
  image) + 0.5 P(equal): the Mann-Whitney statistic, ties given average ranks.
- fpr95: the false-positive rate (unknown images taken for known) at the first threshold, sweeping
  from the highest score down, where the true-positive rate (known images kept) reaches 95%: the
  lowest FPR of any threshold "score >= t" with TPR >= 0.95.
- aupr: the area under the precision-recall curve with known as positive (AUPR-In), as average
  precision: sum over the distinct thresholds of (R_k - R_{k-1}) P_k, no interpolation; tied scores
  form one threshold.
- aupr_out: the same with unknown as positive and the score negated (AUPR-Out).

Calibration: ece, the expected calibration error over 15 equal-width confidence bins
(Guo et al. 2017): sum over bins of |B|/n * |accuracy(B) - mean confidence(B)|, bin b holding the
confidences in (b/15, (b+1)/15] (0 goes into the first bin).

Every function returns a fraction in [0, 1]; the runner records percent, as every other metric.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from dynammo.prediction import headline_probs

ECE_BINS = 15
TPR_LEVEL = 0.95


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of values in ascending order, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # the last rank of each group of equal values
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def auroc(known, unknown) -> float:
    """Area under the ROC curve, known as positive: the Mann-Whitney U statistic / (n_known n_unknown)."""
    pos, neg = _np(known), _np(unknown)
    n1, n0 = len(pos), len(neg)
    if not n1 or not n0:
        raise ValueError("auroc needs at least one known and one unknown score")
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def _curve(pos: np.ndarray, neg: np.ndarray):
    """(true positives, false positives) at each distinct threshold t, "score >= t", from the highest
    score down."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    # the last index of each group of equal scores: one threshold per distinct value
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp = np.cumsum(is_pos)[last]
    fp = (last + 1) - tp
    return tp, fp


def fpr_at_tpr(known, unknown, level: float = TPR_LEVEL) -> float:
    """FPR at the first threshold (highest first) whose TPR is >= level."""
    pos, neg = _np(known), _np(unknown)
    if not len(pos) or not len(neg):
        raise ValueError("fpr_at_tpr needs at least one known and one unknown score")
    tp, fp = _curve(pos, neg)
    tpr = tp / len(pos)
    k = int(np.argmax(tpr >= level))  # tpr reaches 1 at the last threshold, so one exists
    return float(fp[k] / len(neg))


def average_precision(positive, negative) -> float:
    """Area under the precision-recall curve of `positive` against `negative` (step-wise)."""
    pos, neg = _np(positive), _np(negative)
    if not len(pos):
        raise ValueError("average_precision needs at least one positive score")
    tp, fp = _curve(pos, neg)
    precision = tp / (tp + fp)
    recall = tp / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(known, unknown) -> float:
    return average_precision(known, unknown)


def aupr_out(known, unknown) -> float:
    return average_precision(-_np(unknown), -_np(known))


def open_set_metrics(known, unknown) -> Optional[Dict[str, float]]:
    """auroc, fpr95, aupr (known positive) and aupr_out as fractions; None without scores of both kinds."""
    known, unknown = _np(known), _np(unknown)
    if not len(known) or not len(unknown):
        return None
    return {"auroc": auroc(known, unknown), "fpr95": fpr_at_tpr(known, unknown),
            "aupr": aupr_in(known, unknown), "aupr_out": aupr_out(known, unknown)}


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE over n_bins equal-width bins of (0, 1]: bin b holds confidences in (b/n, (b+1)/n]."""
    conf, hit = _np(confidence), _np(correct)
    if not len(conf):
        raise ValueError("expected_calibration_error needs at least one prediction")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            total += inside.sum() / len(conf) * abs(hit[inside].mean() - conf[inside].mean())
    return float(total)


# ---- the scores, from a method's predict output ----
def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability over the seen classes (B,): the plain classifier's known-score."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def known_score(out: dict) -> torch.Tensor:
    """The known-score of each image (B,): the method's own ("known_score" in its predict output, e.g.
    ACL/DynaMMo's 1 - min over heads of p(others)), else the max-softmax of the headline classifier
    (its "probs" where it has them, as iCaRL's NME: the score belongs to the classifier the accuracy is of)."""
    return out["known_score"].float() if "known_score" in out else headline_probs(out).max(dim=1).values
