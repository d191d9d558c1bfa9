"""The prompt protocols' transforms (issue 22, part 2): RandomResizedCrop + flip in training and
Resize + CenterCrop at test, as L2P/DualPrompt/CODA-Prompt's official code, drawn on the original
image's geometry when it is stored squashed to a square (keep_aspect)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynammo.assembly import build_run
from dynammo.configure import load_config
from dynammo.data.imageset import ImageSet, resize_uint8
from dynammo.data.transforms import BatchTransform
from dynammo.protocols import protocol_record

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN0, STD1 = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _ramps(n: int, side: int) -> torch.Tensor:
    """uint8 images whose channel 0 is the column and channel 1 the row (x4): a crop's box can be
    read back from the output's value range."""
    ar = torch.arange(side) * 4
    img = torch.stack([ar.view(1, side).expand(side, side), ar.view(side, 1).expand(side, side),
                       torch.zeros(side, side, dtype=torch.long)])
    return img.to(torch.uint8).unsqueeze(0).expand(n, -1, -1, -1).contiguous()


def _box_shares(out: torch.Tensor, side: int):
    """Width and height of each image's box as a share of the stored side (from the ramps' spans)."""
    span = 4 * (side - 1)
    w = (out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))) / span
    h = (out[:, 1].amax(dim=(1, 2)) - out[:, 1].amin(dim=(1, 2))) / span
    return w, h


def test_resized_crop_draws_area_and_ratio_as_random_resized_crop():
    side, n = 60, 400
    tf = BatchTransform(MEAN0, STD1, train=True, flip=False, resized_crop=True)
    out = tf(_ramps(n, side), torch.Generator().manual_seed(0)) * 255
    w, h = _box_shares(out, side)
    area = w * h
    assert area.min() > 0.06 and area.max() <= 1.0 + 1e-6  # scale (0.08, 1), up to pixel rounding
    assert area.min() < 0.15 and (area > 0.85).any()  # the whole range is drawn, not a fixed zoom
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4  # ratio (3/4, 4/3) on a square image
    # the old pad-and-crop keeps the scale: every box is the whole side
    pad = BatchTransform(MEAN0, STD1, train=True, crop_padding=side // 8) (_ramps(n, side), torch.Generator())
    assert not torch.allclose(out, pad * 255)


def test_resized_crop_ratio_is_drawn_on_the_original_geometry():
    """An image twice as tall as wide, stored squashed to a square: the box's width / height on the
    original (share_w * W) / (share_h * H) lies in [3/4, 4/3], so on the stored square it is twice that."""
    side, n = 60, 400
    tf = BatchTransform(MEAN0, STD1, train=True, flip=False, resized_crop=True)
    aspect = torch.full((n,), 2.0)
    out = tf(_ramps(n, side), torch.Generator().manual_seed(1), aspect) * 255
    w, h = _box_shares(out, side)
    on_original = (w * 1.0) / (h * 2.0)  # W = 1, H = 2
    assert on_original.min() > 0.7 and on_original.max() < 1.4
    assert (w / h).min() > 1.4  # without the aspect the stored-square ratio would be in [3/4, 4/3]


def test_resized_crop_flips_half_the_images():
    side, n = 32, 400
    tf = BatchTransform(MEAN0, STD1, train=True, flip=True, resized_crop=True)
    out = tf(_ramps(n, side), torch.Generator().manual_seed(2)) * 255
    mirrored = out[:, 0, :, 0].mean(1) > out[:, 0, :, -1].mean(1)  # the column ramp runs right to left
    assert 0.4 < mirrored.float().mean() < 0.6


def _smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([128 + 100 * np.sin(3 * xx + 1), 128 + 100 * np.cos(4 * yy), 255 * xx * yy], axis=-1)
    return rgb.round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(64, 64), (96, 48), (40, 100)])
def test_center_crop_is_resize_then_center_crop_of_the_original(h, w):
    """The test view equals torchvision's Resize(int(side*256/224)) + CenterCrop(side) applied to the
    original (non-square) image, computed here from the image stored squashed to side x side."""
    from torchvision.transforms import v2

    side = 56
    original = torch.from_numpy(_smooth_image(h, w)).permute(2, 0, 1).contiguous()
    ref = v2.CenterCrop(side)(v2.Resize(int(side * 256 / 224), antialias=True)(original)).float()
    stored = resize_uint8(original.unsqueeze(0), side)
    tf = BatchTransform(MEAN0, STD1, train=False, center_crop=True)
    ours = tf(stored, aspect=torch.tensor([h / w])) * 255
    assert (ours[0] - ref).abs().mean() < 3.0  # two bilinear resamplings against one: a few grey levels
    plain = BatchTransform(MEAN0, STD1, train=False)(stored) * 255  # what the test view was before
    assert (plain[0] - ref).abs().mean() > 6.0


def test_prompt_protocols_use_their_papers_transforms():
    for name, test_crop in (("cifar100_l2p", "center"), ("imagenet_r_dualprompt", "center"),
                            ("cifar100_coda", "none"), ("imagenet_r_coda", "none")):
        cfg = load_config([name, "l2p"])
        assert cfg.augment_crop == "resized" and cfg.test_crop == test_crop, name
        assert cfg.keep_aspect is name.startswith("imagenet_r"), name
        assert protocol_record(cfg)["values"]["augment_crop"] == "resized"
    # protocols that do not use the new keys keep the hash their earlier runs recorded
    # (docs/results_mednist.md: mednist_cpu 83ca15803e2d)
    assert protocol_record(load_config(["mednist_cpu", "replay"]))["hash"] == "83ca15803e2d"
    assert "augment_crop" not in protocol_record(load_config(["mednist_cpu", "replay"]))["values"]


def _write_folder(root: Path, shapes):
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for k, (h, w) in enumerate(shapes):
            Image.fromarray(_smooth_image(h, w)[:, :, ::(1 if c else -1)].copy()).save(root / name / f"{k}.png")


def test_keep_aspect_reads_each_images_ratio_and_the_engine_uses_it(tmp_path):
    shapes = [(40, 20), (20, 40), (30, 30), (50, 25), (24, 48)]
    _write_folder(tmp_path, shapes)
    common = ["dataset=folder", f"data_root={tmp_path}", "img_size=16", "init_cls=2", "increment=2", "shuffle=false",
              "test_fraction=0.4", "memory_size=0", "progress=false", "test_crop=center", "backbone=resnet18_cifar"]
    kept = build_run(load_config(["digits", "finetune"], common + ["keep_aspect=true"]))
    ratios = {round(h / w, 3) for h, w in shapes}
    assert set(torch.round(kept.data.train.aspect * 1000).div(1000).tolist()) <= ratios
    assert len(set(kept.data.train.aspect.tolist())) > 1
    sub = kept.data.test.subset(torch.tensor([1, 0]))
    assert torch.equal(sub.aspect, kept.data.test.aspect[[1, 0]])  # subsets keep their images' ratios
    engine, test = kept.engine, kept.data.test
    views = engine.apply(lambda x: x, test)
    assert torch.allclose(views, engine.test_tf(test.images, aspect=test.aspect))
    squashed = build_run(load_config(["digits", "finetune"], common))
    assert squashed.data.test.aspect is None
    assert not torch.allclose(views, squashed.engine.apply(lambda x: x, squashed.data.test))
