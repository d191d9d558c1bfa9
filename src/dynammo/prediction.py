"""What a method's `predict` returns, and the one decision rule read from it (evaluation, export,
benchmarks). A plain dict at run time, so `torch.export` traces it."""
from __future__ import annotations

from typing import Dict, Tuple, TypedDict

import torch


class Prediction(TypedDict, total=False):
    logits: torch.Tensor  # (B, n_seen) of the headline classifier: always there
    pred: torch.Tensor  # (B,) a method's own decision rule (else the argmax of logits)
    probs: torch.Tensor  # (B, n_seen) a method's own class probabilities (iCaRL's NME)
    task_il_logits: torch.Tensor  # (B, n_seen) logits for the task-given evaluation / the chosen head's
    task_id: torch.Tensor  # (B,) the inferred task of methods that infer it (ACL, DynaMMo)
    known_score: torch.Tensor  # (B,) a method's own open-set score
    # and "pred_<name>" (B,) per extra classifier (iCaRL's CNN head beside its NME)


EXTRA_PREFIX = "pred_"


def predicted_class(out: Prediction) -> torch.Tensor:
    """The headline classifier's class id: the method's own rule, else the argmax of its logits."""
    pred = out.get("pred")
    return out["logits"].argmax(1) if pred is None else pred.long()


def extra_predictions(out: Prediction) -> Dict[str, torch.Tensor]:
    """{name: class ids} of the extra classifiers."""
    return {k[len(EXTRA_PREFIX):]: v.long() for k, v in out.items() if k.startswith(EXTRA_PREFIX)}


def headline_probs(out: Prediction) -> torch.Tensor:
    """(B, n_seen) class probabilities of the headline classifier: the method's own ("probs", e.g.
    iCaRL's NME), else the softmax of its logits."""
    probs = out.get("probs")
    return torch.softmax(out["logits"].float(), dim=1) if probs is None else probs.float()


def decision(out: Prediction) -> Tuple[torch.Tensor, torch.Tensor]:
    """(class id, confidence) of the headline classifier. Min-others methods (ACL, DynaMMo) give the
    chosen head's probability of the class; a method with its own class probabilities ("probs",
    iCaRL's NME) those; the others the softmax of their logits. Evaluation's ECE is of this confidence."""
    pred = predicted_class(out)
    probs = out["task_il_logits"] if out.get("task_id") is not None else headline_probs(out)
    return pred, probs.gather(1, pred.unsqueeze(1)).squeeze(1)
