"""The user's own folders and CSV files: split folder/file names in any case (train|training,
test|testing, val|valid|validation), a data_root holding one single folder, and the refused layouts
(a folder of classes inside a class folder, images mixed with sub-folders)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynammo.configure import build_config
from dynammo.data import load_data
from dynammo.data.datasets import DATASETS
from dynammo.errors import UserError

CLASSES = {"pituitary": 40, "glioma": 10, "notumor": 30, "meningioma": 20}  # written in this unsorted order


def raw_load(dataset, root, seed=1, **kw):
    cfg = build_config({"dataset": dataset, "data_root": str(root), **kw})
    return DATASETS.get(dataset)(cfg, Path(root), seed)


def make_tree(root: Path, image_tools, per_class=2, classes=CLASSES, offset=0):
    for name, value in classes.items():
        for i in range(per_class):
            image_tools.write(root / name / f"{name}_{i}.jpg", image_tools.const(value + offset, 8), fmt="PNG")
    return root


def test_training_testing_folders_are_the_split_not_two_classes(tmp_path, image_tools):
    """The Brain Tumor MRI layout: data_root/Training/<class>/*.jpg + data_root/Testing/<class>/*.jpg."""
    make_tree(tmp_path / "Training", image_tools, per_class=3)
    make_tree(tmp_path / "Testing", image_tools, per_class=1, offset=1)
    raw = raw_load("folder", tmp_path)
    assert raw.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert len(raw.train) == 12 and len(raw.test) == 4
    assert torch.bincount(raw.train.labels).tolist() == [3, 3, 3, 3]
    assert raw.test.labels.tolist() == [0, 1, 2, 3]
    assert all("/Training/" in s for s in raw.train.sources) and all("/Testing/" in s for s in raw.test.sources)
    assert raw.split == "folders Training (train) and Testing (test)"
    test = raw.test.materialize()
    assert test.images[:, 0, 0, 0].tolist() == [11, 21, 31, 41]  # labels follow the sorted class names


def test_a_single_top_folder_is_descended_into(tmp_path, image_tools, reversed_listing):
    top = tmp_path / "BrainTumorMRI"
    make_tree(top / "Training", image_tools, per_class=2)
    make_tree(top / "Testing", image_tools, per_class=1)
    raw = raw_load("folder", tmp_path)
    assert raw.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert (len(raw.train), len(raw.test)) == (8, 4)
    assert raw.split == "folders BrainTumorMRI/Training (train) and BrainTumorMRI/Testing (test)"
    # one folder of class folders (no split) is descended into the same way
    make_tree(tmp_path / "other" / "Flowers", image_tools, per_class=5)
    raw = raw_load("folder", tmp_path / "other")
    assert raw.class_names == sorted(CLASSES) and raw.split.startswith("seeded stratified split")
    assert (len(raw.train), len(raw.test)) == (16, 4)


@pytest.mark.parametrize("train,val", [("train", "val"), ("TRAIN", "Valid"), ("training", "validation")])
def test_train_and_val_without_test_makes_val_the_test_split(tmp_path, image_tools, train, val):
    make_tree(tmp_path / train, image_tools, per_class=2)
    make_tree(tmp_path / val, image_tools, per_class=1)
    raw = raw_load("folder", tmp_path)
    assert (len(raw.train), len(raw.test)) == (8, 4)
    assert all(f"/{val}/" in s for s in raw.test.sources)
    assert raw.split == f"folders {train} (train) and {val} (test: there is no test folder, so {val} is the test split)"


def test_train_test_and_val_leaves_val_unused(tmp_path, image_tools):
    make_tree(tmp_path / "train", image_tools, per_class=2)
    make_tree(tmp_path / "test", image_tools, per_class=1)
    make_tree(tmp_path / "val", image_tools, per_class=3)
    raw = raw_load("folder", tmp_path)
    assert (len(raw.train), len(raw.test)) == (8, 4)
    assert not any("/val/" in s for s in raw.train.sources + raw.test.sources)
    assert raw.split == "folders train (train) and test (test); val not used"


def test_train_alone_gets_a_seeded_split(tmp_path, image_tools):
    make_tree(tmp_path / "Train", image_tools, per_class=5)
    raw = raw_load("folder", tmp_path, seed=3)
    assert (len(raw.train), len(raw.test)) == (16, 4)
    assert raw.split == "folder Train only: seeded stratified split, test_fraction 0.2, seed 3"


@pytest.mark.parametrize("names", [("test",), ("Testing", "val"), ("valid",)])
def test_test_or_val_without_train_is_an_error(tmp_path, image_tools, names):
    for n in names:
        make_tree(tmp_path / n, image_tools, per_class=1)
    with pytest.raises(UserError) as exc:
        raw_load("folder", tmp_path)
    msg = str(exc.value)
    assert "no train folder" in msg and str(tmp_path) in msg and "\n" not in msg


def test_two_train_folders_or_a_stray_folder_are_errors(tmp_path, image_tools):
    make_tree(tmp_path / "a" / "train", image_tools, per_class=1)
    make_tree(tmp_path / "a" / "Training", image_tools, per_class=1)
    make_tree(tmp_path / "a" / "test", image_tools, per_class=1)
    with pytest.raises(UserError, match=r"2 train folders \(Training, train\)"):
        raw_load("folder", tmp_path / "a")
    make_tree(tmp_path / "b" / "train", image_tools, per_class=1)
    make_tree(tmp_path / "b" / "test", image_tools, per_class=1)
    make_tree(tmp_path / "b" / "extra", image_tools, per_class=1)
    with pytest.raises(UserError, match="other folders \\(extra\\)"):
        raw_load("folder", tmp_path / "b")


def test_train_and_test_with_different_classes_names_them(tmp_path, image_tools):
    make_tree(tmp_path / "train", image_tools, per_class=1)
    make_tree(tmp_path / "test", image_tools, per_class=1, classes={"glioma": 1, "tumour": 2})
    with pytest.raises(UserError) as exc:
        raw_load("folder", tmp_path)
    msg = str(exc.value)
    assert "different class folders" in msg and "only in test: tumour" in msg and "meningioma" in msg


def test_a_class_folder_holding_class_folders_is_refused(tmp_path, image_tools):
    """data_root/Training/<class>/ given as data_root/<class>: 'Training' would be a class of classes."""
    root = tmp_path / "data"
    make_tree(root / "Scans" / "glioma", image_tools, per_class=1)  # no image of its own
    make_tree(root / "Scans" / "notumor", image_tools, per_class=1)
    make_tree(root / "flat", image_tools, per_class=1)  # keeps data_root from being descended into
    with pytest.raises(UserError) as exc:
        raw_load("folder", root)
    msg = str(exc.value)
    assert "Scans" in msg and "folder of classes" in msg and "data_root/<class>/<image>" in msg
    assert "\n" not in msg


def test_a_class_folder_mixing_images_and_sub_folders_is_refused(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=1)
    image_tools.write(root / "glioma" / "more" / "x.png", image_tools.const(1, 8))
    with pytest.raises(UserError) as exc:
        raw_load("folder", root)
    msg = str(exc.value)
    assert str(root / "glioma") in msg and "mixes images and sub-folders" in msg and "more/" in msg
    # a sub-folder without images (notes, thumbnails cache) is not a mix
    (root / "glioma" / "more" / "x.png").unlink()
    (root / "glioma" / "more" / "notes.txt").write_text("n")
    assert raw_load("folder", root).class_names == sorted(CLASSES)


def test_loose_images_beside_class_folders_are_refused(tmp_path, image_tools):
    root = make_tree(tmp_path / "data", image_tools, per_class=1)
    image_tools.write(root / "stray.png", image_tools.const(1, 8))
    with pytest.raises(UserError, match="stray.png"):
        raw_load("folder", root)


def test_split_folders_through_load_data(tmp_path, image_tools):
    make_tree(tmp_path / "Training", image_tools, per_class=2)
    make_tree(tmp_path / "Testing", image_tools, per_class=1)
    data = load_data(build_config({"dataset": "folder", "data_root": str(tmp_path)}), seed=1)
    assert data.class_names == sorted(CLASSES) and data.split_text() == "folders Training (train) and Testing (test)"


# ---------------------------------------------------------------- CSV split files


def write_csv(path: Path, rows, header="path,label"):
    path.write_text("\r\n".join(([header] if header else []) + [f"{p},{lab}" for p, lab in rows]) + "\r\n")


def csv_images(root: Path, image_tools, n=2, labels=("cat", "ant")):
    rows = []
    for lab in labels:
        for i in range(n):
            image_tools.write(root / "imgs" / f"{lab}_{i}.png", image_tools.const(5, 8))
            rows.append((f"imgs/{lab}_{i}.png", lab))
    return rows


@pytest.mark.parametrize("train,test", [("Training.csv", "Testing.csv"), ("TRAIN.CSV", "test.csv")])
def test_csv_split_names_in_any_case(tmp_path, image_tools, train, test):
    rows = csv_images(tmp_path, image_tools)
    write_csv(tmp_path / train, rows[:1] + rows[2:3])
    write_csv(tmp_path / test, rows[1:2] + rows[3:])
    raw = raw_load("csv", tmp_path)
    assert raw.class_names == ["ant", "cat"] and raw.test.labels.tolist() == [1, 0]
    assert raw.split == f"files {train} (train) and {test} (test)"


def test_csv_val_becomes_the_test_split_or_is_unused(tmp_path, image_tools):
    rows = csv_images(tmp_path, image_tools, n=3)
    write_csv(tmp_path / "train.csv", rows[:2] + rows[3:5])
    write_csv(tmp_path / "valid.csv", [rows[2], rows[5]])
    raw = raw_load("csv", tmp_path)
    assert (len(raw.train), len(raw.test)) == (4, 2)
    assert raw.split == "files train.csv (train) and valid.csv (test: there is no test file, so valid.csv is the test split)"
    write_csv(tmp_path / "Test.csv", [rows[0]])
    raw = raw_load("csv", tmp_path)
    assert (len(raw.train), len(raw.test)) == (4, 1)
    assert raw.split == "files train.csv (train) and Test.csv (test); valid.csv not used"


def test_csv_test_without_train_is_an_error(tmp_path, image_tools):
    rows = csv_images(tmp_path, image_tools)
    write_csv(tmp_path / "validation.csv", rows)
    with pytest.raises(UserError, match="no train file"):
        raw_load("csv", tmp_path)
