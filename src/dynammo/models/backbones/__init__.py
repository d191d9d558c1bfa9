"""Backbones, one module per family: resnet.py (torchvision and CIFAR ResNets), vit.py (Vision
Transformers, timm), efficientnet.py (EfficientNet-Lite). Each registers its names in BACKBONES
(base.py) when imported here; `build_backbone` builds one by name from the config's keys.
"""
from __future__ import annotations

from typing import Optional

from dynammo.models.backbones import vit
from dynammo.models.backbones.base import BACKBONES, Backbone
from dynammo.registry import register_modules

# every module of this package registers a family of backbones, but base.py (what they share)
register_modules(__name__, __path__, helpers=("base",))


def backbone_kwargs(cfg, scenario=None) -> dict:
    """build_backbone's keyword arguments from a config: the input side (img_size, else the side of
    the scenario's images) and vit_cpu's sizes."""
    def get(key, default=None):
        return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)

    side = get("img_size")
    if side is None and scenario is not None:
        side = getattr(getattr(scenario, "train", None), "size", None)
    out = {"img_size": side}
    for key, default in vit.VIT_CPU_DEFAULTS.items():
        out[key] = get(key, default)
    return out


def backbone_has_stages(name: str) -> bool:
    """Whether the backbone has residual stages (stage hooks, stage outputs, a last ReLU): every
    backbone but the Vision Transformers."""
    return not vit.is_vit(name)


def build_backbone(name: str, pretrained=False, *, img_size: Optional[int] = None, vit_patch_size: int = 8,
                   vit_embed_dim: int = 64, vit_depth: int = 5, vit_heads: int = 4) -> Backbone:
    """A backbone by name; pretrained: False | True (the family's published weights) | the path of a
    weights file. img_size and the vit_* sizes matter for the ViTs only (their position embedding is
    built for img_size x img_size inputs, and a timm weights tag may follow their name); ResNets and
    EfficientNets take any input size."""
    if vit.is_vit(name):
        return vit.build_vit(name, pretrained, img_size=img_size, vit_patch_size=vit_patch_size,
                             vit_embed_dim=vit_embed_dim, vit_depth=vit_depth, vit_heads=vit_heads)
    return BACKBONES.get(name)(pretrained)
