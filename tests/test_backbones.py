"""Backbones: feature sizes, stage hooks, and loading local pretrained weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from dynammo.errors import UserError
from dynammo.models.backbones import BACKBONES, build_backbone
from dynammo.models.backbones.base import load_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED_DIMS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048,
    "resnet18_cifar": 512, "resnet34_cifar": 512, "resnet50_cifar": 2048,
    "resnet20": 64, "resnet32": 64, "resnet44": 64, "resnet56": 64,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_holds_the_expected_backbones():
    assert set(EXPECTED_DIMS) <= set(BACKBONES.names())


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_feature_dim_and_stage_channels(name):
    net = build_backbone(name).eval()
    x = torch.randn(2, 3, 16, 16)
    seen = []

    def hook(stage, t):
        seen.append((stage, t.shape[1]))
        return t

    with torch.no_grad():
        feat, stages = net(x, stage_hook=hook, return_stages=True)
    assert net.out_dim == EXPECTED_DIMS[name]
    assert feat.shape == (2, EXPECTED_DIMS[name])
    assert len(stages) == len(net.stage_names)
    assert stages[-1].shape[1] == net.out_dim
    # the channels each hook sees are what stage_channels() promises (adapters are sized from it)
    assert [c for _, c in seen] == net.stage_channels()


def test_stage_hook_is_called_once_per_stage_in_order():
    net = build_backbone("resnet32").eval()
    calls = []

    def hook(stage, t):
        calls.append(stage)
        return t

    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)
        hooked = net(x, stage_hook=hook)
    assert calls == ["layer1", "layer2", "layer3"] == net.stage_names
    assert torch.allclose(plain, hooked)
    calls.clear()
    net18 = build_backbone("resnet18_cifar").eval()
    with torch.no_grad():
        net18(x, stage_hook=hook)
    assert calls == ["layer1", "layer2", "layer3", "layer4"]


def test_stage_hook_output_is_used():
    net = build_backbone("resnet20").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = net(x)
        changed = net(x, stage_hook=lambda s, t: t * 0 if s == "layer3" else t)
    assert not torch.allclose(plain, changed)


def test_cifar_resnet_depth_must_be_6n_plus_2():
    from dynammo.models.backbones.resnet import CifarResNet

    with pytest.raises(ValueError):
        CifarResNet(21)


# ---------------------------------------------------------------- pretrained weights


def _torchvision_resnet18():
    """A randomly initialised torchvision ResNet-18 with non-trivial BatchNorm statistics."""
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(123)
    return _torchvision_resnet18()


def _tv_features(net, x):
    fc, net.fc = net.fc, nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = fc


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model"])
def test_load_pretrained_round_trip(tmp_path, tv_resnet18, wrap):
    state = tv_resnet18.state_dict()
    assert any(k.startswith("fc.") for k in state)  # the torchvision format has the classifier
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap in ("state_dict", "model"):
        state = {wrap: state, "epoch": 3}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    x = torch.randn(2, 3, 32, 32)
    loaded = build_backbone("resnet18", str(path)).eval()
    with torch.no_grad():
        out = loaded(x)
    assert torch.allclose(out, _tv_features(tv_resnet18, x), atol=1e-5)
    fresh = build_backbone("resnet18").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), out, atol=1e-3)  # the weights really were loaded


def test_load_pretrained_accepts_a_path_object(tmp_path, tv_resnet18):
    path = tmp_path / "w.pt"
    torch.save(tv_resnet18.state_dict(), path)
    net = build_backbone("resnet18")
    load_pretrained(net, path)
    assert torch.equal(net.conv1.weight, tv_resnet18.conv1.weight)
    assert torch.equal(net.layer4[1].bn2.running_var, tv_resnet18.layer4[1].bn2.running_var)


def test_missing_key_is_named(tmp_path, tv_resnet18):
    state = dict(tv_resnet18.state_dict())
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError) as exc:
        build_backbone("resnet18", str(tmp_path / "w.pt"))
    msg = str(exc.value)
    assert "1 missing" in msg and "layer4.1.bn2.weight" in msg and str(tmp_path / "w.pt") in msg


def test_unexpected_key_is_named(tmp_path, tv_resnet18):
    state = dict(tv_resnet18.state_dict())
    state["adapter.down.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match="unexpected keys .*adapter.down.weight"):
        build_backbone("resnet18", str(tmp_path / "w.pt"))


def test_wrong_shape_is_named(tmp_path, tv_resnet18):
    torch.save(tv_resnet18.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError) as exc:  # the CIFAR stem has a 3x3 conv1, torchvision's is 7x7
        build_backbone("resnet18_cifar", str(tmp_path / "w.pt"))
    msg = str(exc.value)
    assert "wrong shape" in msg and "conv1.weight" in msg and "(64, 3, 7, 7)" in msg and "(64, 3, 3, 3)" in msg


def test_other_architecture_is_rejected(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(UserError, match="unexpected keys .*layer1.2"):
        build_backbone("resnet18", str(tmp_path / "r34.pt"))


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(UserError, match="cannot be loaded"):
        build_backbone("resnet18", str(path))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="state dict"):
        build_backbone("resnet18", str(tmp_path / "list.pt"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_pretrained_true_without_downloadable_weights():
    with pytest.raises(UserError, match="resnet32"):
        build_backbone("resnet32", True)


def test_pretrained_true_offline_names_the_url(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError) as exc:
        build_backbone("resnet18", True)
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in str(exc.value)
    assert "pretrained=PATH" in str(exc.value)


def test_pretrained_false_and_unknown_backbone():
    assert isinstance(build_backbone("resnet20", False), nn.Module)
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        build_backbone("resnet81")


def test_channels_last_maxpool_equals_torch_maxpool_values_and_gradients():
    from dynammo.models.backbones.resnet import MaxPool2dNHWC

    x = torch.randn(2, 8, 15, 15, requires_grad=True)
    ref, fast = nn.MaxPool2d(3, 2, 1), MaxPool2dNHWC(3, 2, 1)
    a, b = ref(x), fast(x)
    assert torch.equal(a, b) and b.is_contiguous()
    ga, = torch.autograd.grad(a.square().sum(), x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    assert torch.equal(ga, gb)
    assert isinstance(build_backbone("resnet18").maxpool, MaxPool2dNHWC)
