"""File-backed data path at 224 px: dynammo against a bare torchvision ImageFolder + DataLoader.

Both read the same JPEG files in the ImageFolder layout, decode, resize to 224 x 224, take a
random 224 crop of the image zero-padded by 28 px, flip and normalise (torchvision per image in the
workers; dynammo decodes in the workers and augments whole batches, as every run does); both use
the same batch size and number of DataLoader workers. dynammo is measured twice: augmenting each
batch on the CPU in the main process (CPU training) and leaving the augmentation to the device
(with a GPU the engine moves the uint8 batch there first, so the CPU only decodes and resizes).
Rounds alternate between the contenders so machine noise hits all; medians and ratios to the bare
loader are reported. Goal (issue 11): no slower than the bare loader.

The images are generated (smooth random colour fields, JPEG quality 90) at the sizes the big
datasets have on disk: 500x375 (ImageNet's typical size) and 1024x1024 (ISIC 2019's BCN_20000).

    python benchmarks/loader_speed.py [--images 512] [--workers 0 2] [--rounds 3] [--out docs/loader_speed.md]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynammo.configure import build_config
from dynammo.data import load_data
from dynammo.data.loader import iterate_batches
from dynammo.data.transforms import make_transforms


def write_images(root: Path, n: int, size, classes: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        path = root / f"class{i % classes}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def bare_rate(root: Path, batch: int, workers: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.RandomCrop(224, padding=224 // 8),
                             transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                         num_workers=workers)
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def dynammo_rate(root: Path, batch: int, workers: int, augment_here: bool = True) -> float:
    cfg = build_config({"dataset": "folder", "data_root": str(root), "img_size": 224, "in_memory": "false",
                        "test_fraction": 0.01, "num_workers": workers, "batch_size": batch, "normalize": "imagenet"})
    data = load_data(cfg, seed=0)
    train_tf, _ = make_transforms(data, augment=True)
    gen = torch.Generator().manual_seed(0)
    t0, n = time.perf_counter(), 0
    for x, _, _ in iterate_batches(data.train, batch, shuffle=True, generator=gen, num_workers=workers):
        if augment_here:  # CPU training augments the batch on the CPU; with a GPU the engine does it there
            train_tf(x, gen)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    lines = ["| source size | workers | bare ImageFolder img/s | dynammo, augmentation on the CPU img/s | ratio | "
             "dynammo, augmentation on the device img/s | ratio |", "|---|---|---|---|---|---|---|"]
    for size in ((500, 375), (1024, 1024)):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "images"
            write_images(root, args.images, size)
            for workers in args.workers:
                bare, cpu_aug, dev_aug = [], [], []
                for _ in range(args.rounds):
                    bare.append(bare_rate(root, args.batch_size, workers))
                    cpu_aug.append(dynammo_rate(root, args.batch_size, workers))
                    dev_aug.append(dynammo_rate(root, args.batch_size, workers, augment_here=False))
                b, c, d = (statistics.median(v) for v in (bare, cpu_aug, dev_aug))
                lines.append(f"| {size[0]}x{size[1]} | {workers} | {b:.1f} | {c:.1f} | {c / b:.2f} | {d:.1f} | {d / b:.2f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
