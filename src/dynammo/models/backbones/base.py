"""What every backbone is and shares: the `Backbone` interface, the BACKBONES registry every backbone
module registers in, and reading a state dict of pretrained weights.

Every backbone exposes its residual stages by name (`stage_names`), and its forward takes an
optional `stage_hook(name, x) -> x` applied at the input of each stage: adapters (ACL, DynaMMo) and
feature distillation (PODNet) plug in there without subclassing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.errors import UserError
from dynammo.registry import Registry

# name -> factory(pretrained) -> Backbone; the ViTs (vit.py) also take their input side and sizes
BACKBONES: Registry = Registry("backbone")
StageHook = Callable[[str, torch.Tensor], torch.Tensor]
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "linear.")


class Backbone(nn.Module):
    stage_names: List[str]
    out_dim: int

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, stage_hook: Optional[StageHook] = None, return_stages: bool = False):
        return self.body(self.stem(x), stage_hook, return_stages)

    def body(self, x: torch.Tensor, stage_hook: Optional[StageHook] = None, return_stages: bool = False):
        """Everything after the stem: the residual stages (with the hook) and global pooling. Lets a
        multi-path model (ACL) run the stem once and the body once per path."""
        stages = []
        for name in self.stage_names:
            if stage_hook is not None:
                x = stage_hook(name, x)
            x = getattr(self, name)(x)
            stages.append(x)
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return (feat, stages) if return_stages else feat

    def stage_channels(self) -> List[int]:
        """Channels at the input of each stage."""
        raise NotImplementedError

    def remove_last_relu(self) -> None:
        """Drop the ReLU at the end of the last residual block, so the pooled feature can take
        negative values (UCIR, Hou et al. 2019, feeds its cosine classifier this way; PODNet too)."""
        raise UserError(f"backbone {type(self).__name__} cannot drop its last ReLU; use a ResNet backbone "
                        "or set last_relu=true")


def read_state_dict(path: Path) -> dict:
    try:
        found = path.is_file()
    except OSError:  # a name the file system refuses (too long, ...)
        found = False
    if not found:
        raise UserError(f"pretrained weights file {path} does not exist; give the path of a saved state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle with code, not a torch file
        raise UserError(f"pretrained weights file {path} cannot be loaded ({exc.__class__.__name__}); "
                        "save it with torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"pretrained weights file {path} does not hold a state dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def check_state_dict(state: dict, own: dict, path, name: str) -> None:
    """One error naming the missing, unexpected and wrongly shaped keys of `state` against `own`."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} keys of the wrong shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
    if problems:
        raise UserError(f"pretrained weights {path} do not match backbone {name}: "
                        f"{'; '.join(problems)}; use weights of the same architecture")


def load_pretrained(backbone: Backbone, path) -> None:
    """Load a torchvision/timm-format state dict; the classifier is dropped, any other mismatch is an error."""
    path = Path(path)
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(CLASSIFIER_PREFIXES)}
    check_state_dict(state, backbone.state_dict(), path, type(backbone).__name__)
    backbone.load_state_dict(state)
