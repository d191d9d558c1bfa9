"""The networks of self-supervised pretraining around one backbone of the registry.

- SimSiam (Chen & He, CVPR 2021, sec. 4): the encoder f = backbone + projection MLP (every fc
  followed by BN, ReLU after all but the output fc; 3 fc layers for ImageNet, 2 in the paper's CIFAR
  runs) and the prediction MLP h (fc 2048 -> 512 with BN and ReLU, then fc 512 -> 2048 without BN
  or ReLU). Both views go through f and h with gradients; the loss stops the gradient at z. As the
  authors' builder.py: the projector's output BN has no affine parameters, and the encoder is built
  with `zero_init_residual=True` (the last BN of every residual block starts at weight 0, so each
  block starts as its shortcut).
- MoCo-v2 (Chen, Fan, Girshick & He, arXiv 2003.04297): the query encoder = backbone + a 2-layer
  MLP head (fc -> ReLU -> fc to 128 d), l2-normalised; the key encoder is a copy updated as a moving
  average (never by the optimiser); keys come from a queue of earlier batches. Shuffling BN (MoCo,
  He et al. CVPR 2020, sec. 3.3) is emulated on one device: the batch is cut into `bn_groups` groups
  that take their BatchNorm statistics separately, and the key encoder sees the batch shuffled
  across the groups (its outputs put back in order), so a query and its key never share statistics.

Only `backbone` leaves the pretraining (backbone.pt); the heads are discarded, as in the papers.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchvision.models.resnet import BasicBlock, Bottleneck

from dynammo.models.backbones.resnet import _CifarBlock
from dynammo.pretrain.losses import KeyQueue, info_nce, momentum_update_, simsiam_loss


def projection_mlp(in_dim: int, dim: int, layers: int, affine_output: bool = True) -> nn.Sequential:
    """fc-BN(-ReLU) layers; affine_output=False: the last BN only standardises (SimSiam's builder.py)."""
    mods: List[nn.Module] = []
    d = in_dim
    for i in range(layers):
        last = i == layers - 1
        mods += [nn.Linear(d, dim, bias=False), nn.BatchNorm1d(dim, affine=affine_output or not last)]
        if not last:
            mods.append(nn.ReLU(inplace=True))
        d = dim
    return nn.Sequential(*mods)


def zero_init_residual_(network: nn.Module) -> int:
    """torchvision's zero_init_residual on any ResNet of the registry: the weight of the last BN of every
    residual block set to 0 (Goyal et al. 2017). Returns the number of blocks changed."""
    changed = 0
    for m in network.modules():
        bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, (BasicBlock, _CifarBlock)) else None
        if bn is not None and bn.weight is not None:
            nn.init.zeros_(bn.weight)
            changed += 1
    return changed


def prediction_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, proj_dim: int = 2048, proj_layers: int = 3, pred_dim: int = 512,
                 stop_gradient: bool = True, zero_init_residual: bool = True):
        """zero_init_residual: as builder.py's encoder (off for a backbone that starts from weights)."""
        super().__init__()
        self.backbone = backbone
        if zero_init_residual:
            zero_init_residual_(backbone)
        self.projector = projection_mlp(backbone.out_dim, proj_dim, proj_layers, affine_output=False)
        self.predictor = prediction_mlp(proj_dim, pred_dim)
        self.stop_gradient = stop_gradient

    def trainable(self) -> List[nn.Parameter]:
        return list(self.parameters())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """z: the projector's output (what the collapse of SimSiam's Fig. 2 is measured on)."""
        return self.projector(self.backbone(x))

    def probe(self, x: torch.Tensor) -> dict:
        """The backbone feature and the embedding of one forward pass (the monitor)."""
        f = self.backbone(x)
        return {"feature": f, "embed": self.projector(f)}

    def loss(self, x1: torch.Tensor, x2: torch.Tensor, generator: Optional[torch.Generator] = None):
        z1, z2 = self.embed(x1), self.embed(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2, self.stop_gradient), None


class MoCoV2(nn.Module):
    def __init__(self, backbone: nn.Module, queue_size: int, dim: int = 128, hidden_dim: Optional[int] = None,
                 momentum: float = 0.999, temperature: float = 0.2, bn_groups: int = 2,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        hidden = hidden_dim or backbone.out_dim
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(backbone.out_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        # the key encoder starts as a copy of the query encoder and is never trained by the optimiser
        self.key_backbone = copy.deepcopy(backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in list(self.key_backbone.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        self.queue = KeyQueue(queue_size, dim, generator or torch.Generator().manual_seed(0))
        self.momentum, self.temperature, self.bn_groups = momentum, temperature, bn_groups
        self.pending: Optional[torch.Tensor] = None  # this step's keys, pushed after the optimiser step

    def trainable(self) -> List[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def query_encoder(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.head)

    def key_encoder(self) -> nn.Module:
        return nn.Sequential(self.key_backbone, self.key_head)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def probe(self, x: torch.Tensor) -> dict:
        f = self.backbone(x)
        return {"feature": f, "embed": self.head(f)}

    def _groups(self, n: int) -> int:
        return max(1, min(self.bn_groups, n // 2))

    def _grouped(self, encoder: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
        if groups == 1:
            return encoder(x)
        return torch.cat([encoder(part) for part in x.chunk(groups)])

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._grouped(self.query_encoder(), x, self._groups(len(x))), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        groups = self._groups(len(x))
        if groups == 1:
            return F.normalize(self.key_encoder()(x), dim=1)
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        k = self._grouped(self.key_encoder(), x[perm], groups)
        out = torch.empty_like(k)
        out[perm] = k  # back in the batch's order
        return F.normalize(out, dim=1)

    def loss(self, xq: torch.Tensor, xk: torch.Tensor, generator: Optional[torch.Generator] = None):
        q = self.queries(xq)
        k = self.keys(xk, generator)
        loss, logits = info_nce(q, k, self.queue.keys, self.temperature)
        self.pending = k.detach()
        return loss, logits

    @torch.no_grad()
    def after_step(self) -> None:
        """After the optimiser step: the key encoder follows the query encoder, this batch's keys
        enter the queue (the oldest leave)."""
        momentum_update_(self.key_encoder(), self.query_encoder(), self.momentum)
        if self.pending is not None:
            self.queue.push(self.pending)
            self.pending = None

    def train(self, mode: bool = True):
        super().train(mode)
        # the key encoder always runs in training mode (its BatchNorm takes the batch's statistics), as in MoCo
        self.key_backbone.train(True)
        self.key_head.train(True)
        return self
