"""Decoding one image file: size, channels and the reduced-scale JPEG decode."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dynammo.data.imageset import decode_image


def smooth_jpeg(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def full_scale_reference(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def test_large_jpeg_decoded_at_reduced_scale_matches_full_decode():
    data = smooth_jpeg(1024, 768)
    with Image.open(io.BytesIO(data)) as img:  # the reduced scale this decode uses: 1/2 (512x384 >= 224)
        img.draft("RGB", (224, 224))
        assert img.size == (512, 384)
    out = decode_image(data, channels=3, size=224)
    assert out.shape == (3, 224, 224) and out.dtype.is_floating_point is False
    diff = np.abs(out.numpy().astype(int) - full_scale_reference(data, 224).astype(int))
    assert diff.mean() < 1.5 and diff.max() < 40  # the same picture, up to resampling noise


def test_small_and_non_jpeg_images_are_not_reduced():
    data = smooth_jpeg(200, 150)  # smaller than the target: decoded at full scale, then upsized
    assert np.array_equal(decode_image(data, 3, 224).numpy(), full_scale_reference(data, 224))
    buf = io.BytesIO()
    Image.fromarray(np.full((600, 600), 77, np.uint8)).save(buf, format="PNG")
    gray = decode_image(buf.getvalue(), channels=1, size=64)
    assert gray.shape == (1, 64, 64) and int(gray.min()) == int(gray.max()) == 77


def test_corrupt_file_in_a_worker_is_one_line_naming_it(tmp_path):
    import pytest
    import torch

    from dynammo.data.imageset import ImageSet
    from dynammo.data.loader import iterate_batches
    from dynammo.errors import UserError

    good = tmp_path / "good.jpg"
    good.write_bytes(smooth_jpeg(64, 64))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    images = ImageSet(torch.tensor([0, 1]), sources=[str(good), str(bad)], channels=3, size=32)
    for workers in (0, 1):
        with pytest.raises(UserError) as exc:
            list(iterate_batches(images, 2, num_workers=workers))
        msg = str(exc.value)
        assert "\n" not in msg and str(bad) in msg and "remove or replace the file" in msg
