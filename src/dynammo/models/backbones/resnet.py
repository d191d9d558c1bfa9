"""ResNets: torchvision's (ImageNet stem), the same with a CIFAR stem, and CIFAR ResNets (He et al. 2016,
sec. 4.2: 6n+2 layers, 16/32/64 channels). Parameter names follow torchvision, so torchvision and timm
ResNet state dicts load directly.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dynammo.errors import UserError
from dynammo.models.backbones.base import BACKBONES, Backbone, load_pretrained

TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}


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


# registered name -> its network, built without weights
RESNETS = {
    **{arch: functools.partial(TorchvisionResNet, arch) for arch in TORCHVISION_WEIGHTS},
    **{f"{arch}_cifar": functools.partial(TorchvisionResNet, arch, cifar_stem=True) for arch in TORCHVISION_WEIGHTS},
    **{f"resnet{depth}": functools.partial(CifarResNet, depth) for depth in (20, 32, 44, 56)},
}


def build_resnet(name: str, pretrained=False) -> Backbone:
    """A ResNet by registered name; pretrained: False | True (torchvision's ImageNet weights, downloaded) |
    the path of a state dict."""
    backbone = RESNETS[name]()
    if pretrained is True:
        if name not in TORCHVISION_WEIGHTS:
            raise UserError(f"no downloadable pretrained weights for backbone '{name}'; use pretrained=false or a file path")
        weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # no network, proxy errors, ...
            raise UserError(f"could not download pretrained weights for {name} ({exc.__class__.__name__}); "
                            f"download them elsewhere ({weights.url}) and set pretrained=PATH") from exc
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    elif pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


for _name in RESNETS:
    BACKBONES.register(_name)(functools.partial(build_resnet, _name))
