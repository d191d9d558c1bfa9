"""Backbones: torchvision ResNets (ImageNet stem), the same with a CIFAR stem, and CIFAR ResNets
(He et al. 2016, sec. 4.2: 6n+2 layers, 16/32/64 channels).

Every backbone exposes its residual stages by name (`stage_names`), and its forward takes an
optional `stage_hook(name, x) -> x` applied at the input of each stage: adapters (ACL, DynaMMo) and
feature distillation (PODNet) plug in there without subclassing. Parameter names follow
torchvision, so torchvision and timm ResNet state dicts load directly. The Vision Transformers (timm) are in vit.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dynammo.errors import UserError
from dynammo.registry import Registry

BACKBONES: Registry = Registry("backbone")
StageHook = Callable[[str, torch.Tensor], torch.Tensor]


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


class MaxPool2dNHWC(nn.MaxPool2d):
    """nn.MaxPool2d that pools CPU tensors in channels-last layout: the same values (a max is exact),
    ~14x faster than PyTorch's NCHW CPU kernel, which made the ImageNet stem's pool take a quarter
    of a ResNet-18's inference time on CPU. The output keeps the input's layout (NCHW stays NCHW; a
    channels-last input, see compute.py, stays channels-last for the layers after it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        out = super().forward(x.contiguous(memory_format=torch.channels_last))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out
        return out.contiguous()


class TorchvisionResNet(Backbone):
    def __init__(self, arch: str, cifar_stem: bool = False):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        if cifar_stem:  # 3x3 stride-1 stem, no max-pool: keeps resolution for 32 px images
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            pool = net.maxpool
            net.maxpool = MaxPool2dNHWC(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                        ceil_mode=pool.ceil_mode)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.stage_names = ["layer1", "layer2", "layer3", "layer4"]
        self.out_dim = net.fc.in_features

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage_channels(self):
        return [64] + [self._out_channels(n) for n in self.stage_names[:-1]]

    def remove_last_relu(self) -> None:
        # Same module and parameter names (checkpoints and pretrained weights still load): only the
        # class of the last block changes, to one whose forward ends with the residual sum.
        block = getattr(self, self.stage_names[-1])[-1]
        block.__class__ = _LINEAR_OUTPUT.get(type(block), type(block))  # idempotent

    def _out_channels(self, name):
        block = getattr(self, name)[-1]
        return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


class _CifarBlock(nn.Module):
    """Basic block with the parameter-free 'option A' shortcut (subsample + zero-pad channels)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin
        self.relu_out = True  # False: the block ends with the residual sum (see remove_last_relu)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.extra:
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + short) if self.relu_out else out + short


class CifarResNet(Backbone):
    def __init__(self, depth: int):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        self.stage_names = ["layer1", "layer2", "layer3"]
        for i, cout in enumerate((16, 32, 64)):
            blocks = [_CifarBlock(cin if b == 0 else cout, cout, 2 if (b == 0 and i > 0) else 1) for b in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.out_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def stage_channels(self):
        return [16, 16, 32]

    def remove_last_relu(self) -> None:
        getattr(self, self.stage_names[-1])[-1].relu_out = False


class _BasicBlockLinearOut(torchvision.models.resnet.BasicBlock):
    """torchvision's basic block without the final ReLU (He et al. 2016's block, output = residual sum)."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity


class _BottleneckLinearOut(torchvision.models.resnet.Bottleneck):
    """torchvision's bottleneck block without the final ReLU."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity


_LINEAR_OUTPUT = {torchvision.models.resnet.BasicBlock: _BasicBlockLinearOut,
                  torchvision.models.resnet.Bottleneck: _BottleneckLinearOut}


for _arch in ("resnet18", "resnet34", "resnet50"):
    BACKBONES.register(_arch)(lambda a=_arch: TorchvisionResNet(a))
    BACKBONES.register(f"{_arch}_cifar")(lambda a=_arch: TorchvisionResNet(a, cifar_stem=True))
for _depth in (20, 32, 44, 56):
    BACKBONES.register(f"resnet{_depth}")(lambda d=_depth: CifarResNet(d))

TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "linear.")


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


def backbone_kwargs(cfg, scenario=None) -> dict:
    """build_backbone's keyword arguments from a config: the input side (img_size, else the side of
    the scenario's images) and vit_cpu's sizes."""
    def get(key, default=None):
        return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)

    side = get("img_size")
    if side is None and scenario is not None:
        side = getattr(getattr(scenario, "train", None), "size", None)
    out = {"img_size": side}
    for key, default in _vit.VIT_CPU_DEFAULTS.items():
        out[key] = get(key, default)
    return out


def backbone_has_stages(name: str) -> bool:
    """Whether the backbone has residual stages (stage hooks, stage outputs, a last ReLU): every
    backbone but the Vision Transformers."""
    return not _vit.is_vit(name)


def build_backbone(name: str, pretrained=False, *, img_size: Optional[int] = None, vit_patch_size: int = 8,
                   vit_embed_dim: int = 64, vit_depth: int = 5, vit_heads: int = 4) -> Backbone:
    """A backbone by name. img_size and the vit_* sizes matter for the ViTs only (their position
    embedding is built for img_size x img_size inputs); ResNets take any input size."""
    if _vit.is_vit(name):
        return _vit.build_vit(name, pretrained, img_size=img_size, vit_patch_size=vit_patch_size,
                              vit_embed_dim=vit_embed_dim, vit_depth=vit_depth, vit_heads=vit_heads)
    key = BACKBONES.canonical(name)
    if _efficientnet.is_efficientnet(key):
        return _efficientnet.build_efficientnet(key, pretrained)
    backbone = BACKBONES.get(key)()
    if pretrained is True:
        if key not in TORCHVISION_WEIGHTS:
            raise UserError(f"no downloadable pretrained weights for backbone '{key}'; use pretrained=false or a file path")
        weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[key]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # no network, proxy errors, ...
            raise UserError(f"could not download pretrained weights for {key} ({exc.__class__.__name__}); "
                            f"download them elsewhere ({weights.url}) and set pretrained=PATH") from exc
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    elif pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


from dynammo.models import vit as _vit  # noqa: E402  (registers the ViT backbones)
from dynammo.models import efficientnet as _efficientnet  # noqa: E402  (registers the EfficientNet-Lite backbones)
