"""ImageNet-1K, ImageNet-100, ImageNet-R, TinyImageNet and CUB-200-2011 on tiny generated files in
each dataset's exact on-disk layout (file names, list formats, CSV headers, CRLF), and their
protocols. The documented class counts are monkeypatched down to the few classes generated, except
where a test checks that the real count is enforced."""
from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from dynammo.configure import build_config
from dynammo.data.datasets import DATASETS, cub200, imagenet, imagenet_r, tinyimagenet
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

# wnid -> pixel value of its images; deliberately not in sorted order
WNIDS = {"n04552348": 30, "n01440764": 10, "n02119789": 20}
SORTED = sorted(WNIDS)


def raw_load(dataset, root, seed=1, **kw):
    cfg = build_config({"dataset": dataset, "data_root": str(root), **kw})
    return DATASETS.get(dataset)(cfg, Path(root), seed)


def write(path: Path, value: int, image_tools) -> Path:
    """A constant 8x8 RGB image; PNG bytes under any name (exact pixels; PIL reads by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_tools.png_bytes(image_tools.const(value, 8, rgb=True)))
    return path


def values(part) -> list:
    return part.materialize().images[:, 0, 0, 0].tolist()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def single_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def no_network(*a, **kw):
    raise AssertionError("download: false must not download")


# ---------------------------------------------------------------- ImageNet-1K


@pytest.fixture
def few_classes(monkeypatch):
    monkeypatch.setattr(imagenet, "NUM_CLASSES", len(WNIDS))
    monkeypatch.setattr(imagenet, "NUM_CLASSES_100", len(WNIDS))
    monkeypatch.setattr(imagenet_r, "NUM_CLASSES", len(WNIDS))
    monkeypatch.setattr(tinyimagenet, "NUM_CLASSES", len(WNIDS))
    monkeypatch.setattr(cub200, "NUM_CLASSES", len(WNIDS))


def make_imagenet_train(top: Path, image_tools, per_class=2):
    for wnid, v in WNIDS.items():
        for k in range(per_class):
            write(top / "train" / wnid / f"{wnid}_{1000 + k}.JPEG", v, image_tools)


# the flat val images: ILSVRC2012_val_<k> -> wnid (k = 1..6)
FLAT_VAL = {1: "n02119789", 2: "n04552348", 3: "n01440764", 4: "n02119789", 5: "n01440764", 6: "n04552348"}
# ILSVRC2012_IDs of the devkit, NOT sorted-wnid order (as the real meta.mat: kit fox is ID 1, tench 449)
ILSVRC_ID = {"n02119789": 1, "n04552348": 2, "n01440764": 3}


def make_flat_val(top: Path, image_tools):
    for k, wnid in FLAT_VAL.items():
        write(top / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", WNIDS[wnid] + 1, image_tools)


def meta_mat_bytes() -> bytes:
    """A meta.mat as the devkit's: a 1 x N struct array `synsets` with ILSVRC2012_ID, WNID, words,
    num_children, ...; a non-leaf synset (num_children > 0) follows the leaves."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    rows = [(np.array([[i]], dtype=np.uint16), w, f"words of {w}", "gloss", np.array([[0]], dtype=np.uint16))
            for w, i in ILSVRC_ID.items()]
    rows.append((np.array([[4]], dtype=np.uint16), "n00001740", "entity", "gloss", np.array([[3]], dtype=np.uint16)))
    synsets = np.array([rows], dtype=dtype)
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def ground_truth_text() -> str:
    return "".join(f"{ILSVRC_ID[FLAT_VAL[k]]}\n" for k in sorted(FLAT_VAL))


def make_devkit(folder: Path) -> Path:
    kit = folder / "ILSVRC2012_devkit_t12"
    (kit / "data").mkdir(parents=True)
    (kit / "data" / "meta.mat").write_bytes(meta_mat_bytes())
    (kit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(ground_truth_text())
    return kit


def check_imagenet(raw, flat=True):
    assert raw.class_names == SORTED
    assert torch.bincount(raw.train.labels).tolist() == [2, 2, 2]
    assert not raw.train.in_memory and raw.train.channels == 3
    assert values(raw.train) == [WNIDS[SORTED[y]] for y in raw.train.labels.tolist()]
    assert values(raw.test) == [WNIDS[SORTED[y]] + 1 for y in raw.test.labels.tolist()]
    if flat:  # ILSVRC2012_val_<k> in file order, labelled through the devkit's IDs, ids by sorted wnid
        assert raw.test.labels.tolist() == [SORTED.index(FLAT_VAL[k]) for k in sorted(FLAT_VAL)]


def test_imagenet1000_reorganised_val(tmp_path, image_tools, few_classes, reversed_listing):
    top = tmp_path / "ilsvrc2012"
    make_imagenet_train(top, image_tools)
    for wnid, v in WNIDS.items():
        write(top / "val" / wnid / "ILSVRC2012_val_00000001.JPEG", v + 1, image_tools)
    raw = raw_load("imagenet1k", tmp_path)
    check_imagenet(raw, flat=False)
    assert raw.test.labels.tolist() == [0, 1, 2]
    assert raw.split == "official train/ and val/<wnid>/ folders as the test split"
    assert raw_load("ilsvrc2012", top).class_names == SORTED  # data_root may be the top folder itself


@pytest.mark.parametrize("where", ["extracted", "tar.gz"])
def test_imagenet1000_flat_val_labelled_by_the_devkit(tmp_path, image_tools, few_classes, monkeypatch, where):
    top = tmp_path / "ILSVRC2012"
    make_imagenet_train(top, image_tools)
    make_flat_val(top, image_tools)
    if where == "extracted":
        make_devkit(top)
    else:
        kit = make_devkit(tmp_path / "kit")
        archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"  # beside the top folder, in data_root
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(kit, arcname="ILSVRC2012_devkit_t12")
        shutil.rmtree(kit.parent)
        with pytest.raises(UserError, match="wrong md5 \\(expected fa75699e90414af021442c21a62c3abf\\)"):
            raw_load("imagenet", tmp_path)
        monkeypatch.setitem(imagenet.ARCHIVES, archive.name, md5(archive))
    raw = raw_load("imagenet", tmp_path)
    check_imagenet(raw)
    assert raw.split.startswith("official train/ and flat val/ labelled by the devkit's ground truth")


def test_imagenet1000_flat_val_labelled_by_kaggle_csv(tmp_path, image_tools, few_classes):
    """Kaggle's layout: ILSVRC/Data/CLS-LOC/{train,val}/ with LOC_val_solution.csv two levels up."""
    top = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    make_imagenet_train(top, image_tools)
    make_flat_val(top, image_tools)
    lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{k:08d},{w} 10 20 30 40 {w} 1 2 3 4"
                                            for k, w in sorted(FLAT_VAL.items(), reverse=True)]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    raw = raw_load("imagenet1000", tmp_path)
    check_imagenet(raw)
    assert raw.split == "official train/ and flat val/ labelled by LOC_val_solution.csv as the test split"


def test_imagenet1000_flat_val_errors(tmp_path, image_tools, few_classes):
    top = tmp_path / "ilsvrc2012"
    make_imagenet_train(top, image_tools)
    make_flat_val(top, image_tools)
    with pytest.raises(UserError, match="no labels were found.*ILSVRC2012_devkit_t12.tar.gz"):
        raw_load("imagenet1000", tmp_path)
    make_devkit(top)
    (top / "val" / "ILSVRC2012_val_00000004.JPEG").unlink()
    with pytest.raises(UserError) as exc:
        raw_load("imagenet1000", tmp_path)
    assert "lists 1 file(s) that do not exist" in single_line(exc) and "ILSVRC2012_val_00000004.JPEG" in str(exc.value)
    write(top / "val" / "ILSVRC2012_val_00000004.JPEG", 1, image_tools)
    write(top / "val" / "ILSVRC2012_val_00000099.JPEG", 1, image_tools)
    with pytest.raises(UserError, match="does not label \\(ILSVRC2012_val_00000099\\)"):
        raw_load("imagenet1000", tmp_path)


def test_imagenet1000_missing_tars_and_class_count(tmp_path, image_tools, monkeypatch):
    with pytest.raises(UserError) as exc:
        raw_load("imagenet1000", tmp_path)
    assert "ImageNet-1K not found under" in single_line(exc) and "ilsvrc2012/train/<wnid>/*.JPEG" in str(exc.value)
    # only the official tars: md5 first, then how to extract them
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"not the val tar")
    with pytest.raises(UserError, match="expected 29b22e2961454d5413ddabcf34fc5622"):
        raw_load("imagenet1000", tmp_path)
    monkeypatch.setitem(imagenet.ARCHIVES, "ILSVRC2012_img_val.tar", md5(tmp_path / "ILSVRC2012_img_val.tar"))
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"x" * 100)
    monkeypatch.setattr(imagenet, "MD5_CHECK_MAX_BYTES", 50)  # the train tar is too big to hash here
    with pytest.raises(UserError) as exc:
        raw_load("imagenet1000", tmp_path)
    msg = single_line(exc)
    assert "are not extracted" in msg and "ILSVRC2012_img_train.tar md5 should be 1d675b47d978889d74fa0da5fadfb00e" in msg
    assert "each inner n<wnid>.tar" in msg
    # the train tar extracted but not its 1000 class tars
    (tmp_path / "ilsvrc2012" / "train").mkdir(parents=True)
    (tmp_path / "ilsvrc2012" / "train" / "n01440764.tar").write_bytes(b"")
    with pytest.raises(UserError, match="class tars \\(n01440764.tar, ...\\) not extracted"):
        raw_load("imagenet1000", tmp_path)
    # the real class count is enforced: 3 wnid folders are not ImageNet-1K
    shutil.rmtree(tmp_path / "ilsvrc2012")
    make_imagenet_train(tmp_path / "ilsvrc2012", image_tools, per_class=1)
    with pytest.raises(UserError, match="has 3 classes, but ImageNet-1K has 1000"):
        raw_load("imagenet1000", tmp_path)


# ---------------------------------------------------------------- ImageNet-100


def test_imagenet100_cl_pytorch_lists(tmp_path, image_tools, few_classes):
    """miniImageNet/{train,val}.txt, CRLF, paths with and without the leading '/' CL_Pytorch needs;
    ids are the lists' labels (here not in sorted-wnid order)."""
    top = tmp_path / "miniImageNet"
    label = {"n04552348": 0, "n01440764": 1, "n02119789": 2}
    train, val = [], []
    for wnid, y in label.items():
        for k in range(2):
            rel = f"train/{wnid}/{wnid}_{k}.JPEG"
            write(top / rel, WNIDS[wnid], image_tools)
            train.append(f"{'/' if k == 0 else ''}{rel} {y}")
        write(top / "val" / f"{wnid}.JPEG", WNIDS[wnid] + 1, image_tools)
        val.append(f"/val/{wnid}.JPEG {y}")
    (top / "train.txt").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (top / "val.txt").write_bytes(("\r\n".join(val) + "\r\n").encode())
    raw = raw_load("imagenet-100", tmp_path)
    assert raw.class_names == list(label)
    assert raw.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and raw.test.labels.tolist() == [0, 1, 2]
    assert values(raw.test) == [31, 11, 21] and not raw.train.in_memory
    assert raw.split == f"CL_Pytorch lists train.txt (train) and val.txt (test) in {top}"
    (top / "val.txt").write_text(val[0] + "\n/val/gone.JPEG 1\n")
    with pytest.raises(UserError, match="val.txt lists 1 file\\(s\\) that do not exist.*val/gone.JPEG"):
        raw_load("imagenet100", tmp_path)
    (top / "val.txt").unlink()
    with pytest.raises(UserError, match="split list .*val.txt does not exist"):
        raw_load("imagenet100", tmp_path)


def test_imagenet100_podnet_lists_relative_to_the_imagenet_root(tmp_path, image_tools, few_classes):
    top = tmp_path / "imagenet"
    make_imagenet_train(top, image_tools)
    for wnid, v in WNIDS.items():
        write(top / "val" / wnid / "ILSVRC2012_val_00000007.JPEG", v + 1, image_tools)
    split = tmp_path / "imagenet_split"
    split.mkdir()
    (split / "train_100.txt").write_text("".join(f"train/{w}/{w}_{1000 + k}.JPEG {i}\n" for i, w in enumerate(SORTED)
                                                 for k in range(2)))
    (split / "val_100.txt").write_text("".join(f"val/{w}/ILSVRC2012_val_00000007.JPEG {i}\n" for i, w in enumerate(SORTED)))
    raw = raw_load("imagenet_100", tmp_path)
    assert raw.class_names == SORTED and raw.test.labels.tolist() == [0, 1, 2]
    assert values(raw.test) == [11, 21, 31]
    assert raw.split == f"PODNet lists train_100.txt (train) and val_100.txt (test) in {split}"


def test_imagenet100_image_folders_and_class_count(tmp_path, image_tools, few_classes, monkeypatch, reversed_listing):
    top = tmp_path / "seed_1993_subset_100_imagenet" / "data"
    make_imagenet_train(top, image_tools)
    for wnid, v in WNIDS.items():
        write(top / "val" / wnid / "a.JPEG", v + 1, image_tools)
    raw = raw_load("imagenet100", tmp_path)
    assert raw.class_names == SORTED and values(raw.test) == [11, 21, 31]
    assert raw.split == (f"ImageFolder folders train (train) and val (test: there is no test folder, so val is the "
                         f"test split) in {top}")
    monkeypatch.setattr(imagenet, "NUM_CLASSES_100", 100)
    with pytest.raises(UserError, match="has 3 classes, but ImageNet-100 has 100"):
        raw_load("imagenet100", tmp_path)
    with pytest.raises(UserError) as exc:
        raw_load("imagenet100", tmp_path / "elsewhere")
    assert "ImageNet-100 not found under" in single_line(exc)
