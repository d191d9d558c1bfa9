"""SimSiam's networks as the authors' builder.py (issue 22): the projector's output BatchNorm has no
affine parameters, and the encoder starts with the last BN of every residual block at weight 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dynammo.models.backbones import build_backbone
from dynammo.pretrain.models import SimSiam, zero_init_residual_

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("arch, blocks", [("resnet20", 9), ("resnet18_cifar", 8), ("resnet50", 16)])
def test_simsiam_zero_initialises_the_last_bn_of_every_residual_block(arch, blocks):
    torch.manual_seed(0)
    model = SimSiam(build_backbone(arch, False), proj_dim=32, proj_layers=2, pred_dim=8)
    last = [m.bn3 if hasattr(m, "bn3") else m.bn2 for m in model.backbone.modules() if hasattr(m, "conv2")
            and (hasattr(m, "bn3") or not hasattr(m, "conv3"))]
    assert len(last) == blocks
    assert all(float(bn.weight.detach().abs().max()) == 0.0 for bn in last)
    # the other BNs keep their default init (weight 1), and the blocks still train (weights are parameters)
    others = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) and all(m is not b for b in last)]
    assert others and all(float(m.weight.min()) == 1.0 for m in others)
    # a block whose residual branch ends at 0 passes its shortcut: the stage is its identity/downsample path
    fresh = build_backbone(arch, False)
    assert zero_init_residual_(fresh) == blocks


def test_a_backbone_that_starts_from_weights_is_not_reset():
    backbone = build_backbone("resnet20", False)
    model = SimSiam(backbone, proj_dim=16, proj_layers=2, pred_dim=4, zero_init_residual=False)
    assert all(float(m.weight.min()) == 1.0 for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_projector_output_bn_has_no_affine_parameters():
    model = SimSiam(build_backbone("resnet20", False), proj_dim=16, proj_layers=3, pred_dim=4)
    bns = [m for m in model.projector if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 3
    assert not bns[-1].affine and bns[-1].weight is None and bns[-1].bias is None
    assert all(bn.affine for bn in bns[:-1])
    model.train()
    z = model.embed(torch.randn(8, 3, 16, 16))
    # standardised per dimension over the batch and never rescaled: mean 0, variance 1
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
