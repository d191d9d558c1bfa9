"""Cosine classifiers shared by UCIR and PODNet.

- `CosineClassifier`: class scores are cosine similarities between the L2-normalised feature and
  L2-normalised class weights, times one learnable scale (UCIR's sigma, Hou et al. CVPR 2019,
  Eq. 4; PODNet's eta, Douillard et al. ECCV 2020). Weights are kept in one block per task, so a
  method can freeze the old classes' block while the new one trains.
- With K > 1 proxies per class it is PODNet's local similarity classifier (LSC, Eq. 6): the class
  similarity is sum_k softmax_k(<theta_ck, h>) * <theta_ck, h> over that class's K proxies.
- `imprinted_weights`: new weights from the normalised features of a class (weight imprinting, the
  initialisation of UCIR's and PODNet's reference code): the normalised mean for one proxy, k-means
  centres of the normalised features for K proxies.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.models.backbones import Backbone


def cosine_similarities(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, D) x (N, D) -> (B, N) cosine similarities."""
    return F.linear(F.normalize(features, dim=1), F.normalize(weights, dim=1))


def aggregate_proxies(similarities: torch.Tensor, proxies: int) -> torch.Tensor:
    """(B, C * K) proxy similarities (class-major) -> (B, C) class similarities: the softmax over a
    class's K proxies weights their similarities (PODNet's LSC). K = 1 leaves them unchanged."""
    if proxies == 1:
        return similarities
    # explicit class count: -1 is ambiguous for an empty batch (an empty slice of a multi-process step)
    s = similarities.view(similarities.shape[0], similarities.shape[1] // proxies, proxies)
    return (torch.softmax(s, dim=2) * s).sum(dim=2)


class CosineClassifier(nn.Module):
    """scale * class similarity, over every class seen so far; one weight block per `expand` call."""

    def __init__(self, in_dim: int, proxies: int = 1, scale: float = 1.0):
        super().__init__()
        self.in_dim, self.proxies = in_dim, proxies
        self.blocks = nn.ParameterList()  # block i: (n_i * proxies, in_dim), class-major
        self.scale = nn.Parameter(torch.tensor(float(scale)))  # learnable (sigma / eta)

    @property
    def num_classes(self) -> int:
        return sum(b.shape[0] for b in self.blocks) // self.proxies

    def expand(self, n_new: int) -> nn.Parameter:
        """Add a block for n_new classes (uniform init as nn.Linear); returns it."""
        w = torch.empty(n_new * self.proxies, self.in_dim, device=self.scale.device)
        bound = 1.0 / math.sqrt(self.in_dim)
        nn.init.uniform_(w, -bound, bound)
        block = nn.Parameter(w)
        self.blocks.append(block)
        return block

    def weights(self) -> torch.Tensor:
        return torch.cat(list(self.blocks), dim=0)

    def freeze_old(self) -> None:
        """Every block but the last stops training (old class weights stay fixed)."""
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i == len(self.blocks) - 1)

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """Unscaled class similarities in [-1, 1], (B, num_classes)."""
        return aggregate_proxies(cosine_similarities(features, self.weights()), self.proxies)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.similarities(features)


class CosineNet(nn.Module):
    """A backbone and a cosine classifier over its pooled feature."""

    def __init__(self, backbone: Backbone, proxies: int = 1, scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = CosineClassifier(backbone.out_dim, proxies, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def kmeans_centres(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k cluster centres of `points` (k-means, scikit-learn); with fewer points than k, the points
    are repeated so that every proxy still gets a centre."""
    from sklearn.cluster import KMeans

    x = points.double().cpu().numpy()
    if len(x) < k:
        x = np.concatenate([x] * math.ceil(k / len(x)))[: max(k, len(x))]
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return torch.from_numpy(km.cluster_centers_).float()


def imprinted_weights(class_features: List[torch.Tensor], proxies: int, norm: Optional[float] = None,
                      seed: int = 0) -> torch.Tensor:
    """Weights for new classes from their features (one (n_c, D) tensor per class), class-major:
    the L2-normalised mean of the normalised features (1 proxy) or the normalised k-means centres
    (K proxies), each of L2 norm `norm` (the mean norm of the old weights in the reference code; it
    only sets the step size, a cosine classifier ignores weight norms). Returns (C * K, D)."""
    rows = []
    for f in class_features:
        f = F.normalize(f.float(), dim=1)
        centres = f.mean(0, keepdim=True) if proxies == 1 else kmeans_centres(f, proxies, seed)
        rows.append(F.normalize(centres, dim=1))
    w = torch.cat(rows)
    return w * norm if norm is not None else w
