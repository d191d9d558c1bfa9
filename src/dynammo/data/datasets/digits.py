"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): needs no files."""
from __future__ import annotations

import numpy as np
import torch

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.imageset import ImageSet, stratified_split


@dataset("digits", "no files: scikit-learn's bundled 8x8 digits", shape=DatasetShape(10, 1, 8))
def load(cfg, root, seed) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, seed)
    imgs, labs = torch.from_numpy(images), torch.from_numpy(labels)
    return RawDataset(
        name="digits",
        class_names=[str(i) for i in range(10)],
        train=ImageSet(labs[train_idx], images=imgs[train_idx]),
        test=ImageSet(labs[test_idx], images=imgs[test_idx]),
        flip=False,  # a mirrored digit is not the same digit
        split=f"seeded stratified split, test_fraction {cfg.test_fraction}, seed {seed}",
    )
