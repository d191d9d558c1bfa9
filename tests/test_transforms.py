"""Batch transforms: random crop, flip, normalisation, grayscale to 3 channels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynammo.data import LoadedData
from dynammo.data.imageset import ImageSet
from dynammo.data.transforms import BatchTransform, make_transforms, random_crop

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(b=16, c=3, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)


def _windows(img, pad):
    """Every h x w window of the zero-padded image, keyed by its offset."""
    c, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    return {(dy, dx): padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = _images()  # non-square, values >= 1 so the zero padding is recognisable
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = set()
    for i in range(len(x)):
        match = [off for off, win in _windows(x[i], 2).items() if torch.equal(win, out[i])]
        assert match, f"image {i} is not a window of its padded input"
        offsets.add(match[0])
    assert len(offsets) > 3  # offsets vary from image to image


def test_random_crop_matches_a_manual_crop_for_a_fixed_generator():
    x, pad = _images(b=8), 3
    out = random_crop(x, pad, torch.Generator().manual_seed(7))
    off = torch.randint(0, 2 * pad + 1, (2, len(x)), generator=torch.Generator().manual_seed(7))
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        dy, dx = int(off[0, i]), int(off[1, i])
        assert torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])
    # same generator seed, same crops
    assert torch.equal(out, random_crop(x, pad, torch.Generator().manual_seed(7)))


def test_crop_by_slices_and_by_gather_are_identical():
    """The CPU takes one slice copy per image, an accelerator one gather: both paths, same crops."""
    x, pad = _images(b=16), 3
    by_slices = random_crop(x, pad, torch.Generator().manual_seed(3), per_image=True)
    by_gather = random_crop(x, pad, torch.Generator().manual_seed(3), per_image=False)
    assert torch.equal(by_slices, by_gather)
    assert torch.equal(random_crop(x, pad, torch.Generator().manual_seed(3)), by_slices)  # the CPU default


def test_flip_only_when_training():
    x = _images(b=64, c=1, h=4, w=5)
    ident = dict(mean=(0.0,), std=(1.0,), out_channels=1)
    tf = BatchTransform(train=True, flip=True, **ident)
    out = tf(x, torch.Generator().manual_seed(0))
    ref, flipped = x.float() / 255, x.flip(-1).float() / 255
    same = [torch.allclose(out[i], ref[i]) for i in range(len(x))]
    mirrored = [torch.allclose(out[i], flipped[i]) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # about half are flipped
    for tf in (BatchTransform(train=True, flip=False, **ident), BatchTransform(train=False, flip=True, **ident)):
        assert torch.allclose(tf(x, torch.Generator().manual_seed(0)), ref)


def test_normalisation_numbers():
    x = torch.full((2, 3, 2, 2), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    tf = BatchTransform(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    out = tf(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.full((2, 2, 2), 0.2))  # (0.2 - 0.1) / 0.5
    assert torch.allclose(out[:, 1], torch.zeros(2, 2, 2), atol=1e-6)  # (0.2 - 0.2) / 0.25
    assert torch.allclose(out[:, 2], torch.full((2, 2, 2), -1.0))  # (0.2 - 0.3) / 0.1
    assert torch.equal(x, torch.full((2, 3, 2, 2), 51, dtype=torch.uint8))  # the input is untouched


def test_grayscale_is_expanded_to_three_channels():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    out = BatchTransform(mean=(0.5,), std=(0.5,))(x)
    assert out.shape == (1, 3, 2, 2)
    expected = torch.tensor([[-1.0, 1.0], [-0.6, -0.2]])
    for c in range(3):
        assert torch.allclose(out[0, c], expected, atol=1e-6)
    assert BatchTransform(mean=(0.5,), std=(0.5,), out_channels=1)(x).shape == (1, 1, 2, 2)


def test_test_transform_never_crops():
    x = _images(b=4)
    tf = BatchTransform(mean=(0.0,) * 3, std=(1.0,) * 3, train=False, crop_padding=4, flip=True)
    assert tf.pad == 0
    assert torch.allclose(tf(x), x.float() / 255)


def _data(size, flip):
    imgs = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    s = ImageSet(torch.tensor([0, 1]), images=imgs)
    return LoadedData(["x"], ["a", "b"], s, s, (0.25,), (0.5,), flip)


@pytest.mark.parametrize("size, pad", [(32, 4), (64, 8), (8, 1), (4, 1)])
def test_make_transforms_pads_an_eighth_of_the_side(size, pad):
    train, test = make_transforms(_data(size, flip=True), augment=True)
    assert train.train and train.pad == pad and train.flip
    assert not test.train and test.pad == 0 and not test.flip
    assert torch.allclose(test.mean.flatten(), torch.tensor([0.25])) and torch.allclose(test.std.flatten(),
                                                                                         torch.tensor([0.5]))


def test_make_transforms_respects_flip_and_augment():
    train, _ = make_transforms(_data(32, flip=False), augment=True)
    assert train.pad == 4 and not train.flip  # a digit mirrored is not the same digit
    train, _ = make_transforms(_data(32, flip=True), augment=False)
    assert train.pad == 0 and not train.flip
