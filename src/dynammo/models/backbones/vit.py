"""Vision Transformer backbones: timm's `VisionTransformer`, unchanged, behind the `Backbone` interface.

- `vit_tiny_patch16_224`, `vit_small_patch16_224`, `vit_base_patch16_224`: timm's architectures,
  built for the run's `img_size` (the position embedding fits the input; pretrained ones are
  resampled to it). `<arch>.<tag>` (e.g. `vit_base_patch16_224.orig_in21k`) picks the timm weights
  `pretrained: true` downloads; without a tag timm's default weights are used.
- `vit_cpu`: a small ViT for CPU runs and tests, its sizes set by `vit_patch_size`, `vit_embed_dim`,
  `vit_depth`, `vit_heads` (MLP ratio 2, qkv bias).

The feature is the CLS token after the final norm (`vit.forward_features(x)[:, 0]`). The timm model
is `backbone.vit`, so prompt methods drive `patch_embed`, `_pos_embed`, `norm_pre`, `blocks`, `norm`
themselves. A ViT has no residual stages: stage hooks (ACL, DynaMMo adapters, PODNet's POD-spatial)
and `remove_last_relu` (UCIR/PODNet with last_relu=false) are refused with one line; the methods
check it before anything is built (`Method.backbone_needs`). Attention is left as timm builds it
(fused scaled-dot-product attention on torch >= 2).

`pretrained: PATH` reads a timm-format .safetensors, .pth/.pt/.bin (state dict, possibly nested under
'model'/'state_dict') or the original Google ViT .npz (through timm's `_load_weights`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from dynammo.errors import UserError
from dynammo.models.backbones.base import (BACKBONES, CLASSIFIER_PREFIXES, Backbone, check_state_dict,
                                           read_state_dict)

TIMM_VITS = {  # registry name -> patch size (the architecture's other sizes come from timm)
    "vit_tiny_patch16_224": 16,
    "vit_small_patch16_224": 16,
    "vit_base_patch16_224": 16,
}
VIT_CPU = "vit_cpu"
VIT_CPU_DEFAULTS = dict(vit_patch_size=8, vit_embed_dim=64, vit_depth=5, vit_heads=4)
VIT_CPU_MLP_RATIO = 2.0
DEFAULT_IMG_SIZE = {VIT_CPU: 32, **{name: 224 for name in TIMM_VITS}}  # when neither img_size nor the data give one
NO_DROPOUT = dict(drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0)
HEAD_PREFIXES = CLASSIFIER_PREFIXES + ("pre_logits.", "head_drop.", "fc_norm.")


def no_stages_message(name: str, need: str, alternative: str = "") -> str:
    return (f"{need}, which backbone '{name}' (a Vision Transformer: one token sequence, no residual stages or "
            f"last ReLU) does not have; use a ResNet backbone (e.g. backbone=resnet18, or resnet32 for small "
            f"images){alternative}")


class ViTBackbone(Backbone):
    """timm's VisionTransformer (`self.vit`, no head, no dropout); forward -> the CLS feature after
    the final norm, (B, embed_dim)."""

    def __init__(self, vit, arch: str, tag: Optional[str] = None):
        super().__init__()
        self.vit = vit
        self.arch, self.tag = arch, tag
        self.stage_names = []
        self.out_dim = int(vit.embed_dim)
        self.img_size = int(vit.patch_embed.img_size[0])
        self.patch_size = int(vit.patch_embed.patch_size[0])

    def forward(self, x: torch.Tensor, stage_hook=None, return_stages: bool = False) -> torch.Tensor:
        if stage_hook is not None or return_stages:
            raise UserError(no_stages_message(self.arch, "stage hooks and stage outputs need residual stages"))
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise UserError(f"backbone {self.arch} is built for {self.img_size}x{self.img_size} images, got "
                            f"{x.shape[-2]}x{x.shape[-1]}; set img_size={self.img_size} or rebuild it for the input")
        return self.vit.forward_features(x)[:, 0]

    def stem(self, x):
        raise UserError(no_stages_message(self.arch, "a stem/body split needs residual stages"))

    def body(self, x, stage_hook=None, return_stages=False):
        raise UserError(no_stages_message(self.arch, "a stem/body split needs residual stages"))

    def stage_channels(self):
        raise UserError(no_stages_message(self.arch, "stage adapters need residual stages"))

    def remove_last_relu(self) -> None:
        raise UserError(no_stages_message(self.arch, "last_relu=false drops the ReLU at the end of a ResNet",
                                          " or set last_relu=true"))


# ---------------------------------------------------------------- names


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """'vit_base_patch16_224.orig_in21k' -> ('vit_base_patch16_224', 'orig_in21k'); other names as they are."""
    text = str(name)
    arch, dot, tag = text.partition(".")
    if dot and arch.lower() in TIMM_VITS:
        if not tag:
            raise UserError(f"backbone {text!r} has an empty timm weights tag; write {arch.lower()} or "
                            f"{arch.lower()}.<tag> (see timm.list_pretrained('{arch.lower()}.*'))")
        return arch.lower(), tag.lower()
    return text, None


def is_vit(name: str) -> bool:
    """Whether a backbone name (with or without a timm tag) is one of the ViT backbones."""
    arch, _ = split_name(name)
    return arch.lower() in TIMM_VITS or arch.lower() == VIT_CPU


def check_tag(arch: str, tag: str) -> None:
    import timm

    known = timm.list_pretrained(f"{arch}.*")
    if f"{arch}.{tag}" not in known:
        tags = ", ".join(n.split(".", 1)[1] for n in known) or "none"
        raise UserError(f"timm has no weights tagged '{tag}' for {arch}; its tags: {tags}")


def timm_weights_name(arch: str, tag: Optional[str]) -> Tuple[str, Optional[str]]:
    """The full timm name (arch.tag, timm's default tag when none is given) and its Hugging Face repo."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None:
        return f"{arch}.{tag}" if tag else arch, None
    return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture, cfg.hf_hub_id


# ---------------------------------------------------------------- building


def build_vit(name: str, pretrained=False, img_size: Optional[int] = None, vit_patch_size: int = 8,
              vit_embed_dim: int = 64, vit_depth: int = 5, vit_heads: int = 4) -> ViTBackbone:
    """A ViT backbone by registry name (timm tag allowed), built for img_size x img_size inputs;
    pretrained: False | True (timm download) | path of a local checkpoint."""
    arch, tag = split_name(name)
    arch = BACKBONES.canonical(arch)
    side = int(img_size) if img_size else DEFAULT_IMG_SIZE[arch]
    if arch == VIT_CPU:
        vit = _build_vit_cpu(side, vit_patch_size, vit_embed_dim, vit_depth, vit_heads, pretrained)
    else:
        vit = _build_timm_vit(arch, tag, side, pretrained)
    backbone = ViTBackbone(vit, arch, tag)
    if pretrained and pretrained is not True:
        load_vit_weights(backbone, pretrained)
    return backbone


def _build_vit_cpu(side: int, patch: int, dim: int, depth: int, heads: int, pretrained):
    from timm.models.vision_transformer import VisionTransformer

    if dim % heads:
        raise UserError(f"vit_embed_dim={dim} must be a multiple of vit_heads={heads} (each head gets "
                        "vit_embed_dim / vit_heads dimensions); change one of them")
    if side % patch:
        raise UserError(f"img_size={side} must be a multiple of vit_patch_size={patch} for backbone vit_cpu "
                        f"(e.g. img_size={max(patch, side - side % patch)}); change img_size or vit_patch_size")
    if pretrained is True:
        raise UserError("no downloadable pretrained weights for backbone 'vit_cpu' (a small ViT for CPU runs); "
                        "use pretrained=false or the path of a vit_cpu checkpoint of the same sizes")
    return VisionTransformer(img_size=side, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=VIT_CPU_MLP_RATIO, qkv_bias=True, num_classes=0, global_pool="token",
                             **NO_DROPOUT)


def _build_timm_vit(arch: str, tag: Optional[str], side: int, pretrained):
    import timm

    patch = TIMM_VITS[arch]
    if side % patch:
        raise UserError(f"img_size={side} must be a multiple of {arch}'s patch size {patch} "
                        f"(e.g. img_size={max(patch, side - side % patch)})")
    if tag:
        check_tag(arch, tag)
    kwargs = dict(num_classes=0, global_pool="token", img_size=side, **NO_DROPOUT)
    if pretrained is True:
        full, hub = timm_weights_name(arch, tag)
        try:
            return timm.create_model(full, pretrained=True, **kwargs)
        except Exception as exc:  # no network, no cached copy, proxy errors, ...
            where = f"https://huggingface.co/{hub}" if hub else "the timm model hub"
            raise UserError(f"could not download the pretrained weights {full} ({exc.__class__.__name__}); "
                            f"download them elsewhere ({where}, model.safetensors) and set pretrained=PATH") from None
    return timm.create_model(arch, pretrained=False, **kwargs)


# ---------------------------------------------------------------- local checkpoints


def _check_file(path: Path) -> None:
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        raise UserError(f"pretrained weights file {path} does not exist; give the path of a saved checkpoint")


def read_vit_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A timm-format state dict from .safetensors or a torch file ('module.' and our 'vit.' prefixes dropped)."""
    if path.suffix.lower() == ".safetensors":
        _check_file(path)
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # not a safetensors file, truncated
            raise UserError(f"pretrained weights file {path} cannot be loaded as safetensors "
                            f"({exc.__class__.__name__}); save it with safetensors.torch.save_file") from None
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    else:
        state = read_state_dict(path)
    if state and all(k.startswith("vit.") for k in state):  # saved from a ViTBackbone
        state = {k[4:]: v for k, v in state.items()}
    return state


def resample_pos_embed(state: dict, vit) -> dict:
    """Resample a checkpoint's position embedding (square grid + CLS) to the model's grid, as timm does."""
    from timm.layers import resample_abs_pos_embed

    pos = state.get("pos_embed")
    own = vit.pos_embed
    if pos is None or own is None or pos.dim() != 3 or tuple(pos.shape) == tuple(own.shape):
        return state
    prefix = vit.num_prefix_tokens
    grid = int(round((pos.shape[1] - prefix) ** 0.5))
    if grid * grid != pos.shape[1] - prefix or pos.shape[2] != own.shape[2]:
        return state  # not a square grid of the model's width: the shape check names it
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=list(vit.patch_embed.grid_size),
                                                old_size=[grid, grid], num_prefix_tokens=prefix,
                                                interpolation="bicubic", antialias=True, verbose=False).to(pos.dtype)
    return state


def load_vit_weights(backbone: ViTBackbone, path) -> None:
    """Load a local checkpoint into backbone.vit: the head is dropped, pos_embed resampled to the
    model's grid; any other mismatch is one error that names the keys."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        load_npz(backbone, path)
        return
    state = {k: v for k, v in read_vit_state_dict(path).items() if not k.startswith(HEAD_PREFIXES)}
    state = resample_pos_embed(state, backbone.vit)
    check_state_dict(state, backbone.vit.state_dict(), path, backbone.arch)
    backbone.vit.load_state_dict(state)


class _CopyWatch(TorchFunctionMode):
    """Records which model tensors `Tensor.copy_` writes and refuses a copy of another shape (timm's
    npz loader would otherwise broadcast or fail without naming the parameter)."""

    def __init__(self, names: Dict[int, str], path: Path, arch: str):
        super().__init__()
        self.names, self.path, self.arch, self.written = names, path, arch, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and args and id(args[0]) in self.names:
            name, src = self.names[id(args[0])], args[1]
            if tuple(src.shape) != tuple(args[0].shape):
                raise UserError(f"pretrained weights {self.path} do not match backbone {self.arch}: {name} has shape "
                                f"{tuple(src.shape)} in the file vs {tuple(args[0].shape)}; use weights of the same "
                                "architecture")
            self.written.add(name)
        return func(*args, **kwargs)


def load_npz(backbone: ViTBackbone, path: Path) -> None:
    """The original Google ViT .npz (JAX/Flax keys), through timm's `_load_weights`."""
    import numpy as np
    from timm.models.vision_transformer import _load_weights

    _check_file(path)
    vit = backbone.vit
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
    except Exception as exc:
        raise UserError(f"pretrained weights file {path} is not a readable .npz ({exc.__class__.__name__}); give "
                        "the original Google ViT .npz or a timm .safetensors/.pth") from None
    blocks = {int(m.group(1)) for k in keys for m in [re.search(r"Transformer/encoderblock_(\d+)/", k)] if m}
    extra = sorted(b for b in blocks if b >= len(vit.blocks))
    if extra:
        raise UserError(f"pretrained weights {path} do not match backbone {backbone.arch}: the file has "
                        f"{max(blocks) + 1} transformer blocks, the backbone {len(vit.blocks)}; use weights of the "
                        "same architecture")
    names = {id(t): n for n, t in vit.state_dict(keep_vars=True).items()}
    watch = _CopyWatch(names, path, backbone.arch)
    try:
        with watch:
            _load_weights(vit, str(path))
    except KeyError as exc:
        key = str(exc.args[0]).replace(" is not a file in the archive", "")
        raise UserError(f"pretrained weights {path} do not match backbone {backbone.arch}: the .npz lacks "
                        f"{key!r}; use the original Google ViT .npz of the same architecture") from None
    except ValueError as exc:  # timm: not an npz of a layout it knows
        raise UserError(f"pretrained weights file {path} is not an original Google ViT .npz "
                        f"({str(exc).split('. ')[0]}); give a timm .safetensors/.pth instead") from None
    missing = [n for n in names.values() if n not in watch.written]
    if missing:
        raise UserError(f"pretrained weights {path} do not match backbone {backbone.arch}: {len(missing)} missing "
                        f"keys (e.g. {', '.join(missing[:3])}); use weights of the same architecture")


# ---------------------------------------------------------------- registry


def _register(arch: str) -> None:
    BACKBONES.register(arch)(lambda pretrained=False, **sizes: build_vit(arch, pretrained, **sizes))


for _arch in (*TIMM_VITS, VIT_CPU):
    _register(_arch)
