"""The monitor of a pretraining run: k-NN accuracy of the frozen features and the feature spread.

k-NN (the monitor of InstDisc, Wu et al. CVPR 2018, that MoCo and SimSiam report as well): the
features of a labeled memory bank and of the queries are l2-normalised; each query takes its k
nearest bank features by cosine similarity, and each neighbour votes for its label with weight
exp(cosine / t) (`weighted`, t = 0.07, k = 200 as InstDisc) or 1 (`majority`); the class with the
largest vote wins (ties: the smallest class id). k is capped to the bank's size.

Collapse (SimSiam, sec. 4.1 and Fig. 2): the std over images of each dimension of the
l2-normalised features, averaged over dimensions. Features spread evenly over the unit sphere
give about 1/sqrt(d); a collapse onto one point gives 0. `feature_spread` reports it times
sqrt(d), so that 1 means well spread and 0 collapsed whatever the width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, num_classes: int,
                vote: str = "weighted", temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (M,) of the queries (M, D) from the bank (N, D) with labels (N,)."""
    if len(bank) == 0:
        raise ValueError("the k-NN memory bank is empty")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for part in queries.split(chunk):
        sim = part @ bank.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = torch.exp(top_sim / temperature) if vote == "weighted" else torch.ones_like(top_sim)
        scores = torch.zeros(len(part), num_classes, dtype=weights.dtype, device=weights.device)
        scores.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 k: int, num_classes: int, vote: str = "weighted", temperature: float = 0.07) -> float:
    """Percent of queries whose k-NN prediction is their label."""
    pred = knn_predict(bank, bank_labels, queries, k, num_classes, vote, temperature)
    return 100.0 * float((pred == labels).double().mean()) if len(labels) else float("nan")


def feature_std(features: torch.Tensor) -> float:
    """Per-dimension std (population) of the l2-normalised features, averaged over dimensions."""
    z = F.normalize(features.double(), dim=1)
    return float(z.std(dim=0, correction=0).mean())


def feature_spread(features: torch.Tensor) -> float:
    """feature_std x sqrt(dim): about 1 for features spread over the sphere, 0 for a collapse."""
    return feature_std(features) * math.sqrt(features.shape[1])
