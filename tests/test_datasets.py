"""Dataset sources on generated files in each source's real on-disk layout (folder trees, CSV lists)
and load_data's subsampling, split, normalisation and resizing (MedNIST and MedMNIST, on generated
and on real files: tests/test_datasets_mednist.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynammo.configure import build_config
from dynammo.data import IMAGENET_MEAN, IMAGENET_STD, channel_stats, load_data
from dynammo.data.datasets import DATASETS
from dynammo.data.imageset import stratified_split, subsample_per_class
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


def cfg_for(dataset, root, **kw):
    return build_config({"dataset": dataset, "data_root": str(root), **kw})


def raw_load(dataset, root, seed=1, **kw):
    """The dataset source alone (no subsampling, decoding or normalisation)."""
    return DATASETS.get(dataset)(cfg_for(dataset, root, **kw), Path(root), seed)


def pixel_values(images: torch.Tensor) -> list:
    return images[:, 0, 0, 0].tolist()


# ---------------------------------------------------------------- folder trees

# class name -> pixel value of its (constant) images; created in this (unsorted) order
FOLDER_CLASSES = {"zebra": 200, "apple": 10, "mango": 100}


def make_tree(root: Path, image_tools, per_class=5, classes=FOLDER_CLASSES, offset=0, rgb=False):
    for name, value in classes.items():
        for i in range(per_class):
            image_tools.write(root / name / f"img{i}.png", image_tools.const(value + offset, 8, rgb))
    return root


def test_folder_class_ids_come_from_sorted_names(tmp_path, image_tools, reversed_listing):
    root = make_tree(tmp_path / "data", image_tools)
    raw = raw_load("folder", root)
    assert raw.class_names == ["apple", "mango", "zebra"]
    assert raw.train.channels == 1
    value_of = {0: 10, 1: 100, 2: 200}
    for part in (raw.train, raw.test):
        mem = part.materialize()
        assert pixel_values(mem.images) == [value_of[int(y)] for y in mem.labels]
    # seeded stratified split: 5 images per class -> 1 test, 4 train each
    assert torch.bincount(raw.train.labels).tolist() == [4, 4, 4]
    assert torch.bincount(raw.test.labels).tolist() == [1, 1, 1]
    assert not set(raw.train.sources) & set(raw.test.sources)
    again = raw_load("folder", root)
    assert again.test.sources == raw.test.sources
    other = [raw_load("folder", root, seed=s).test.sources for s in range(2, 8)]
    assert any(o != raw.test.sources for o in other)  # the split depends on the seed


def test_folder_train_test_split_is_kept(tmp_path, image_tools):
    root = tmp_path / "data"
    make_tree(root / "train", image_tools, per_class=3)
    make_tree(root / "test", image_tools, per_class=2, offset=1)  # test images are value + 1
    raw = raw_load("folder", root)
    assert raw.class_names == ["apple", "mango", "zebra"]
    assert len(raw.train) == 9 and len(raw.test) == 6
    assert all("/train/" in s for s in raw.train.sources) and all("/test/" in s for s in raw.test.sources)
    test = raw.test.materialize()
    assert pixel_values(test.images) == [v + 1 for v in (10, 10, 100, 100, 200, 200)]
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_train_test_with_different_classes(tmp_path, image_tools):
    root = tmp_path / "data"
    make_tree(root / "train", image_tools, per_class=1)
    make_tree(root / "test", image_tools, per_class=1, classes={"apple": 1, "mango": 2})
    with pytest.raises(UserError, match="different class folders"):
        raw_load("folder", root)


def test_folder_empty_class_folder(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=2)
    (root / "kiwi").mkdir()
    (root / "kiwi" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as exc:
        raw_load("folder", root)
    assert "kiwi" in str(exc.value) and "no images" in str(exc.value)


def test_folder_missing_or_without_classes(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        raw_load("folder", tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class sub-folders"):
        raw_load("folder", tmp_path / "flat")


def test_folder_corrupt_image_fails_at_materialize(tmp_path, image_tools):
    root = tmp_path / "data"
    make_tree(root / "train", image_tools, per_class=2)
    make_tree(root / "test", image_tools, per_class=2)
    good = image_tools.png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8))
    bad = root / "test" / "mango" / "img1.png"
    bad.write_bytes(good[: len(good) // 2])  # a truncated PNG: the header still reads fine
    raw = raw_load("folder", root)  # listing the files does not decode them
    raw.train.materialize()
    with pytest.raises(UserError) as exc:
        raw.test.materialize()
    assert str(bad) in str(exc.value)
    with pytest.raises(UserError, match="img1.png"):
        load_data(cfg_for("folder", root), seed=1)


def test_folder_garbage_file_is_a_user_error(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=2)
    (root / "apple" / "img0.png").write_bytes(b"definitely not a png")
    with pytest.raises(UserError, match="img0.png"):
        load_data(cfg_for("folder", root), seed=1)


def test_folder_rgb_and_mixed_sizes(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=2, rgb=True)
    image_tools.write(root / "apple" / "big.png", image_tools.const(10, 12, rgb=True))
    raw = raw_load("folder", root)
    assert raw.train.channels == 3
    with pytest.raises(UserError, match="img_size"):
        load_data(cfg_for("folder", root), seed=1)
    data = load_data(cfg_for("folder", root, img_size=6), seed=1)
    assert data.train.images.shape[1:] == (3, 6, 6)
    assert len(data.mean) == 3


# ---------------------------------------------------------------- CSV lists


def write_csv_dataset(root: Path, image_tools, rows_per_class=4, labels=("cat", "ant", "bee"), header=True,
                      name="labels.csv"):
    lines = ["path,label"] if header else []
    for k, label in enumerate(labels):
        for i in range(rows_per_class):
            rel = f"imgs/{label}_{i}.png"
            image_tools.write(root / rel, image_tools.const(10 * (k + 1), 8))
            lines.append(f"{rel},{label}")
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def test_csv_with_header_and_relative_paths(tmp_path, image_tools):
    write_csv_dataset(tmp_path, image_tools)
    raw = raw_load("csv", tmp_path)
    assert raw.class_names == ["ant", "bee", "cat"]
    value_of = {"cat": 10, "ant": 20, "bee": 30}
    mem = raw.train.materialize()
    assert pixel_values(mem.images) == [value_of[raw.class_names[int(y)]] for y in mem.labels]
    assert torch.bincount(raw.train.labels).tolist() == [3, 3, 3]  # round(4 * 0.2) = 1 test image each
    assert torch.bincount(raw.test.labels).tolist() == [1, 1, 1]
    # data_root may be the CSV file itself; a header-less file reads the same
    assert raw_load("csv", tmp_path / "labels.csv").class_names == ["ant", "bee", "cat"]


def test_csv_integer_labels_sort_numerically(tmp_path, image_tools):
    write_csv_dataset(tmp_path, image_tools, rows_per_class=2, labels=("10", "2", "1"), header=False)
    raw = raw_load("csv", tmp_path / "labels.csv")
    assert raw.class_names == ["1", "2", "10"]


def test_csv_train_and_test_files_keep_the_split(tmp_path, image_tools):
    write_csv_dataset(tmp_path, image_tools, rows_per_class=3, name="train.csv")
    lines = ["path,label"] + [f"imgs/{lab}_0.png,{lab}" for lab in ("bee", "ant")]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    raw = raw_load("csv", tmp_path)
    assert raw.class_names == ["ant", "bee", "cat"]
    assert len(raw.train) == 9 and raw.test.labels.tolist() == [1, 0]
    assert raw.test.sources == [str(tmp_path / "imgs" / "bee_0.png"), str(tmp_path / "imgs" / "ant_0.png")]


def test_csv_missing_image_names_line_and_path(tmp_path, image_tools):
    csv_path = write_csv_dataset(tmp_path, image_tools, rows_per_class=2)
    with csv_path.open("a") as fh:
        fh.write("imgs/missing.png,cat\n")
    with pytest.raises(UserError) as exc:
        raw_load("csv", tmp_path)
    msg = str(exc.value)
    assert "line 8" in msg and "missing.png" in msg


def test_csv_malformed_and_missing(tmp_path, image_tools):
    csv_path = write_csv_dataset(tmp_path, image_tools, rows_per_class=2)
    with csv_path.open("a") as fh:
        fh.write("imgs/cat_0.png\n")
    with pytest.raises(UserError, match="path,label"):
        raw_load("csv", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        raw_load("csv", tmp_path / "other")


# ---------------------------------------------------------------- load_data


def test_max_train_per_class_is_seeded_and_per_class():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 6)
    a = subsample_per_class(labels, 3, seed=4)
    assert torch.bincount(labels[a]).tolist() == [3, 2, 3]  # class 1 keeps both of its images
    assert a.tolist() == sorted(a.tolist())
    assert torch.equal(a, subsample_per_class(labels, 3, seed=4))
    assert any(not torch.equal(a, subsample_per_class(labels, 3, seed=s)) for s in range(5, 10))
    assert torch.equal(subsample_per_class(labels, None, seed=4), torch.arange(18))


def test_load_data_subsamples_digits(make_cfg):
    cfg = make_cfg(dataset="digits", max_train_per_class=5, max_test_per_class=2)
    a, b = load_data(cfg, seed=3), load_data(cfg, seed=3)
    assert torch.bincount(a.train.labels).tolist() == [5] * 10
    assert torch.bincount(a.test.labels).tolist() == [2] * 10
    assert torch.equal(a.train.images, b.train.images)
    c = load_data(cfg, seed=4)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape[1:] == (1, 8, 8) and not a.flip


def test_stratified_split_is_seeded_and_stratified():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    tr, te = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(16))
    assert np.bincount(labels[te], minlength=3).tolist() == [2, 1, 0]  # a single image stays in train
    tr2, te2 = stratified_split(labels, 0.2, seed=0)
    assert te.tolist() == te2.tolist()


def test_normalisation_stats_come_from_the_train_set(tmp_path, image_tools):
    root = tmp_path / "data"
    # train: half the pixels 51 (0.2), half 102 (0.4); test: all 255
    for name in ("a", "b"):
        for i in range(2):
            img = np.full((4, 4), 51, np.uint8)
            img[:, 2:] = 102
            image_tools.write(root / "train" / name / f"{i}.png", img)
            image_tools.write(root / "test" / name / f"{i}.png", np.full((4, 4), 255, np.uint8))
    data = load_data(cfg_for("folder", root), seed=1)
    assert data.mean == pytest.approx((0.3,), abs=1e-5)
    expected_std = torch.tensor([0.2, 0.4]).repeat_interleave(32).std().item()  # over all 64 train pixels
    assert data.std == pytest.approx((expected_std,), abs=1e-5)
    assert data.mean == pytest.approx(channel_stats(data.train.images)[0])

    data = load_data(cfg_for("folder", root, normalize="imagenet"), seed=1)
    assert data.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and data.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    data = load_data(cfg_for("folder", root, normalize="none"), seed=1)
    assert data.mean == pytest.approx((0.0,)) and data.std == pytest.approx((1.0,))


def test_img_size_resizes(tmp_path, image_tools, make_cfg):
    root = make_tree(tmp_path / "data", image_tools, per_class=2)
    data = load_data(cfg_for("folder", root, img_size=4), seed=1)
    assert data.train.images.shape[1:] == (1, 4, 4) and data.test.images.shape[1:] == (1, 4, 4)
    assert sorted(set(data.train.images.flatten().tolist())) == [10, 100, 200]  # constant images stay constant
    digits = load_data(make_cfg(dataset="digits", img_size=16, max_train_per_class=2), seed=1)
    assert digits.train.images.shape[1:] == (1, 16, 16) and digits.test.images.shape[1:] == (1, 16, 16)


def test_lazy_loading_needs_img_size(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=2)
    with pytest.raises(UserError, match="img_size"):
        load_data(cfg_for("folder", root, in_memory="false"), seed=1)
    data = load_data(cfg_for("folder", root, in_memory="false", img_size=4), seed=1)
    assert not data.train.in_memory
    assert data.train.get(torch.tensor([0, 1])).shape == (2, 1, 4, 4)
    assert data.mean == pytest.approx(channel_stats(data.train.materialize().images)[0])
