"""ACL adapters, adapter sets, and DynaMMo's merging (uniform mean, exact running mean, BN statistics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynammo.cost import count_flops
from dynammo.errors import UserError
from dynammo.models.adapters import (Adapter, AdapterSet, bn_reestimation, mean_of, running_mean_,
                                     stage_channels)
from dynammo.models.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("single_thread")


def randomized(s: AdapterSet, seed: int, nbt: int = 0) -> AdapterSet:
    """Every float tensor (parameters and BN statistics) random; num_batches_tracked = nbt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(s.named_parameters()) + list(s.named_buffers()):
            if name.endswith("num_batches_tracked"):
                t.fill_(nbt)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    return s


def float_state(s: nn.Module) -> dict:
    return {k: v.clone() for k, v in s.state_dict().items() if v.is_floating_point()}


# ---------------------------------------------------------------- the adapter


def test_adapter_structure_matches_acl():
    a = Adapter(8)
    assert a.conv.kernel_size == (3, 3) and a.conv.stride == (1, 1) and a.conv.padding == (0, 0)
    assert a.deconv.kernel_size == (3, 3) and a.deconv.stride == (1, 1) and a.deconv.padding == (0, 0)
    assert isinstance(a.deconv, nn.ConvTranspose2d)
    assert a.conv.bias is not None and a.deconv.bias is not None
    assert (a.conv.in_channels, a.conv.out_channels, a.deconv.in_channels, a.deconv.out_channels) == (8, 8, 8, 8)
    assert a.alpha.numel() == 1 and a.alpha.requires_grad and a.alpha.item() == pytest.approx(0.02)


def test_adapter_forward_is_the_formula():
    torch.manual_seed(0)
    a = randomized(AdapterSet({"s": 4}), 1).adapters["s"].eval()
    x = torch.randn(2, 4, 7, 5)
    bn = lambda m, h: (h - m.running_mean[None, :, None, None]) / torch.sqrt(  # noqa: E731
        m.running_var[None, :, None, None] + m.eps) * m.weight[None, :, None, None] + m.bias[None, :, None, None]
    h = F.relu(bn(a.bn1, F.conv2d(x, a.conv.weight, a.conv.bias)))
    assert h.shape[-2:] == (5, 3)  # 3x3, no padding: H-2, W-2
    want = a.alpha * F.relu(bn(a.bn2, F.conv_transpose2d(h, a.deconv.weight, a.deconv.bias)))
    got = a(x)
    assert got.shape == x.shape  # the transposed conv restores H x W
    torch.testing.assert_close(got, want)


def test_adapter_rejects_maps_smaller_than_3x3():
    with pytest.raises(UserError, match="img_size"):
        Adapter(4)(torch.zeros(1, 4, 2, 2))


def test_adapter_set_hook_applies_residual_only_at_its_stages():
    s = randomized(AdapterSet({"layer1": 3, "layer3": 3}), 2).eval()
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(s.hook("layer1", x), x + s.adapters["layer1"](x))
    assert torch.equal(s.hook("layer2", x), x)  # no adapter there: identity


def test_adapter_set_plugs_into_backbone_stage_inputs():
    torch.manual_seed(0)
    bb = build_backbone("resnet20").eval()
    s = randomized(AdapterSet(stage_channels(bb)), 3).eval()
    x = torch.randn(2, 3, 8, 8)
    h = bb.stem(x)
    for name in bb.stage_names:  # by hand: x <- x + A(x) at the input of each stage
        h = getattr(bb, name)(h + s.adapters[name](h))
    want = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    torch.testing.assert_close(bb(x, stage_hook=s.hook), want)


def test_stage_channels_and_layer_names():
    bb = build_backbone("resnet18")
    assert stage_channels(bb) == {"layer1": 64, "layer2": 64, "layer3": 128, "layer4": 256}
    assert stage_channels(bb, ["layer3", "layer4"]) == {"layer3": 128, "layer4": 256}
    with pytest.raises(UserError, match="layer9"):
        stage_channels(bb, ["layer9"])
    with pytest.raises(UserError, match="twice"):
        stage_channels(bb, ["layer1", "layer1"])


def test_copy_is_independent_and_keeps_bn_stats_and_alpha():
    s = randomized(AdapterSet({"a": 4}), 4, nbt=7)
    c = s.copy()
    for (k, v), (k2, v2) in zip(s.state_dict().items(), c.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        c.adapters["a"].alpha.add_(1.0)
    assert s.adapters["a"].alpha.item() != c.adapters["a"].alpha.item()


def test_resnet18_adapters_cost_as_in_the_paper():
    """ACL at 224 px on ResNet-18: ~1.63 M parameters and ~0.80 GMACs per task's adapter set."""
    bb = build_backbone("resnet18").eval()
    s = AdapterSet(stage_channels(bb)).eval()
    assert sum(p.numel() for p in s.parameters()) == pytest.approx(1.63e6, rel=0.01)
    x = torch.zeros(1, 3, 224, 224)
    plain = count_flops(bb, x)
    with_adapters = count_flops(lambda t: bb(t, stage_hook=s.hook), x)
    assert plain / 2 == pytest.approx(1.82e9, rel=0.01)
    assert (with_adapters - plain) / 2 == pytest.approx(0.80e9, rel=0.03)


# ---------------------------------------------------------------- merging


def test_mean_of_is_the_elementwise_mean_of_every_float_tensor():
    sets = [randomized(AdapterSet({"l1": 3, "l2": 5}), seed, nbt=10 * (seed + 1)) for seed in range(3)]
    merged = mean_of(sets)
    states = [s.state_dict() for s in sets]
    for key, value in merged.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.long and int(value) == 10  # not averaged (would be 20)
        else:
            want = (states[0][key] + states[1][key] + states[2][key]) / 3
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6)
    assert any(k.endswith("running_mean") for k in merged.state_dict())  # BN statistics are averaged too
    assert any(k.endswith("alpha") for k in merged.state_dict())


def test_running_mean_equals_batch_mean():
    sets = [randomized(AdapterSet({"l1": 4}), seed, nbt=seed + 3) for seed in range(5)]
    merged = sets[0].copy()
    for t in range(2, len(sets) + 1):
        running_mean_(merged, sets[t - 1], t)
        batch = mean_of(sets[:t])
        for (k, v), (k2, w) in zip(merged.state_dict().items(), batch.state_dict().items()):
            assert k == k2
            if k.endswith("num_batches_tracked"):
                assert int(v) == 3  # the merged set's own count, untouched by every merge
            else:
                torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        running_mean_(merged, sets[0], 0)


def test_running_mean_leaves_the_new_set_untouched_and_keeps_parameters():
    a, b = randomized(AdapterSet({"l": 3}), 0), randomized(AdapterSet({"l": 3}), 1)
    b_before = float_state(b)
    params_before = {id(p) for p in a.parameters()}
    running_mean_(a, b, 2)
    assert all(torch.equal(v, b_before[k]) for k, v in float_state(b).items())
    assert {id(p) for p in a.parameters()} == params_before  # in place: optimisers/references stay valid


def test_bn_reestimation_computes_the_data_statistics():
    torch.manual_seed(0)
    s = randomized(AdapterSet({"l": 3}), 5).eval()
    a = s.adapters["l"]
    a.bn1.momentum = 0.3
    x = torch.randn(16, 3, 6, 6) * 2 + 1
    # expected: the statistics of each BN's input, with the BNs normalising by batch statistics
    inputs = {}
    ref = s.copy().train()
    ref.adapters["l"].bn1.register_forward_pre_hook(lambda m, i: inputs.__setitem__("bn1", i[0]))
    ref.adapters["l"].bn2.register_forward_pre_hook(lambda m, i: inputs.__setitem__("bn2", i[0]))
    with torch.no_grad():
        ref.hook("l", x)
    before = a.bn1.running_mean.clone()
    with torch.no_grad(), bn_reestimation(s):
        s.hook("l", x)
    for name in ("bn1", "bn2"):
        bn = getattr(a, name)
        torch.testing.assert_close(bn.running_mean, inputs[name].mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, inputs[name].var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.bn1.running_mean, before)
    assert a.bn1.momentum == 0.3 and a.bn2.momentum == 0.1  # restored
    assert not a.bn1.training and not s.training  # back in eval mode


def test_bn_reestimation_averages_over_batches():
    s = randomized(AdapterSet({"l": 2}), 6).eval()
    x1, x2 = torch.randn(8, 2, 5, 5), torch.randn(8, 2, 5, 5) + 3
    means = []
    for xb in (x1, x2):
        captured = {}
        ref = s.copy().train()
        ref.adapters["l"].bn1.register_forward_pre_hook(lambda m, i: captured.__setitem__("x", i[0]))
        with torch.no_grad():
            ref.hook("l", xb)
        means.append(captured["x"].mean(dim=(0, 2, 3)))
    with torch.no_grad(), bn_reestimation(s):
        s.hook("l", x1)
        s.hook("l", x2)
    torch.testing.assert_close(s.adapters["l"].bn1.running_mean, (means[0] + means[1]) / 2, rtol=1e-5, atol=1e-5)
