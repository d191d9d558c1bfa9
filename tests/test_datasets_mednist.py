"""MedNIST and MedMNIST: on generated files (archive and folder, the .npz files, their download and
every one-line error) and on the real files of ../shared/data (skipped when absent)."""
from __future__ import annotations

import shutil
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dynammo.data import _prepare, channel_stats, load_data
from dynammo.data.datasets import DATASETS
from dynammo.data.datasets.medmnist import CLASS_NAMES, ZENODO
from dynammo.errors import UserError
from test_datasets import cfg_for, pixel_values, raw_load

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- MedNIST (generated)


def test_mednist_archive_and_folder_are_identical(mednist_tree):
    archive, extracted = mednist_tree(top="SomeTop")
    from_tar = raw_load("mednist", archive.parent)
    from_dir = raw_load("mednist", extracted)
    from_file = raw_load("mednist", archive)  # data_root may be the archive itself
    assert from_tar.class_names == from_dir.class_names == from_file.class_names == ["AbdomenCT", "Hand", "HeadCT"]
    for a, b in ((from_tar, from_dir), (from_tar, from_file)):
        assert torch.equal(a.train.labels, b.train.labels) and torch.equal(a.test.labels, b.test.labels)
        assert torch.equal(a.train.materialize().images, b.train.materialize().images)
        assert torch.equal(a.test.materialize().images, b.test.materialize().images)
    # each image's label is its parent folder
    for (name, _), y in zip(from_tar.train.sources, from_tar.train.labels.tolist()):
        assert f"/{from_tar.class_names[y]}/" in name
    for path, y in zip(from_dir.train.sources, from_dir.train.labels.tolist()):
        assert Path(path).parent.name == from_dir.class_names[y]
    assert torch.bincount(from_tar.test.labels).tolist() == [1, 1, 1]


@pytest.mark.parametrize("top", ["MedNIST", "resized"])
def test_mednist_known_folder_names(mednist_tree, top):
    archive, extracted = mednist_tree(top=top, per_class=3)
    raw = raw_load("mednist", extracted)
    assert raw.class_names == ["AbdomenCT", "Hand", "HeadCT"] and len(raw.train) + len(raw.test) == 9
    assert raw.train.channels == 1


def test_mednist_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="mednist.tar.gz"):
        raw_load("mednist", tmp_path / "nothing")
    (tmp_path / "mednist.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="corrupt"):
        raw_load("mednist", tmp_path)
    empty = tmp_path / "e" / "mednist.tar.gz"
    empty.parent.mkdir()
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(UserError, match="no images"):
        raw_load("mednist", empty.parent)


# ---------------------------------------------------------------- MedMNIST npz


def test_medmnist_npz(tmp_path, write_npz):
    _, arrays = write_npz(tmp_path / "bloodmnist.npz", 8, per_class=(2, 1, 1), rgb=True)
    raw = raw_load("bloodmnist", tmp_path)
    assert raw.name == "bloodmnist" and raw.class_names == CLASS_NAMES["bloodmnist"]
    assert raw.train.images.shape == (16, 3, 28, 28) and raw.train.images.dtype == torch.uint8
    assert torch.equal(raw.train.images, torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2))
    assert raw.train.labels.tolist() == arrays["train_labels"][:, 0].tolist()
    assert torch.equal(raw.test.images, torch.from_numpy(arrays["test_images"]).permute(0, 3, 1, 2))
    assert len(raw.test) == 8  # val is not used for testing


def test_medmnist_size_suffix(tmp_path, write_npz):
    write_npz(tmp_path / "breastmnist_64.npz", 2, size=64)
    raw = raw_load("breastmnist_64", tmp_path)
    assert raw.name == "breastmnist_64" and raw.train.images.shape == (6, 1, 64, 64)
    with pytest.raises(UserError, match="breastmnist.npz"):  # the 28 px file is another file
        raw_load("breastmnist", tmp_path, download=False)


def test_medmnist_corrupt_npz(tmp_path, write_npz):
    path, _ = write_npz(tmp_path / "bloodmnist.npz", 8)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt"):
        raw_load("bloodmnist", tmp_path)
    path.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(UserError, match="bloodmnist.npz"):
        raw_load("bloodmnist", tmp_path)
    with path.open("wb") as fh:  # a bare .npy array under the .npz name
        np.save(fh, np.zeros(3))
    with pytest.raises(UserError, match="bloodmnist.npz"):
        raw_load("bloodmnist", tmp_path)


def test_medmnist_missing_keys(tmp_path):
    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8),
             train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(UserError) as exc:
        raw_load("bloodmnist", tmp_path)
    assert "test_images" in str(exc.value) and "test_labels" in str(exc.value)
    assert "train_images" not in str(exc.value).split("lacks")[1].split(";")[0]


def test_medmnist_bad_contents(tmp_path, write_npz):
    _, arrays = write_npz(tmp_path / "breastmnist.npz", 3)  # label 2 does not exist in breastmnist
    with pytest.raises(UserError, match="label 2"):
        raw_load("breastmnist", tmp_path)
    arrays = dict(arrays)
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(UserError, match="uint8"):
        raw_load("breastmnist", tmp_path)


def test_medmnist_missing_without_download(tmp_path, monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("download=false must not download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError) as exc:
        raw_load("dermamnist", tmp_path, download=False)
    msg = str(exc.value)
    assert str(tmp_path / "dermamnist.npz") in msg and ZENODO.format(file="dermamnist.npz") in msg


def test_medmnist_download_offline_names_url(tmp_path, monkeypatch):
    calls = []

    def offline(url, filename=None, *a, **kw):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(UserError) as exc:
        raw_load("pathmnist", tmp_path / "medmnist")
    msg = str(exc.value)
    assert calls == [ZENODO.format(file="pathmnist.npz")]
    assert calls[0] in msg and "pathmnist.npz" in msg and "a8b06965200029087d5bd730944a56c1" in msg
    assert list((tmp_path / "medmnist").iterdir()) == []  # no half-written file left behind


def test_medmnist_download_checks_md5(tmp_path, write_npz, monkeypatch):
    src, _ = write_npz(tmp_path / "src" / "file.npz", 8)

    def fake_download(url, filename, *a, **kw):
        shutil.copyfile(src, filename)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download)
    root = tmp_path / "root"
    with pytest.raises(UserError, match="wrong md5"):  # a 28 px file must match the official md5
        raw_load("bloodmnist", root)
    assert list(root.iterdir()) == []
    raw = raw_load("bloodmnist_64", root)  # no md5 is known for the larger sizes: kept as downloaded
    assert len(raw.train) == 24 and (root / "bloodmnist_64.npz").is_file()


def test_chestmnist_keeps_single_finding_images(tmp_path):
    def labels(rows):
        out = np.zeros((len(rows), 14), np.uint8)
        for r, findings in enumerate(rows):
            out[r, findings] = 1
        return out

    train_rows = [[0], [3], [], [1, 2], [13]]
    test_rows = [[5], [5, 6]]
    imgs = lambda n: np.arange(n, dtype=np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2)
    np.savez(tmp_path / "chestmnist.npz", train_images=imgs(5), train_labels=labels(train_rows),
             val_images=imgs(1), val_labels=labels([[0]]), test_images=imgs(2), test_labels=labels(test_rows))
    raw = raw_load("chestmnist", tmp_path)
    assert raw.train.labels.tolist() == [0, 3, 13]
    assert pixel_values(raw.train.images) == [0, 1, 4]
    assert raw.test.labels.tolist() == [5] and len(raw.class_names) == 14


# ---------------------------------------------------------------- real data (../shared/data)

MEDNIST_CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
MEDNIST_COUNTS = [10000, 8954, 10000, 10000, 10000, 10000]


@pytest.fixture(scope="module")
def real_mednist(shared_file):
    """The real MedNIST archive, read once for the module (about 3 s)."""
    path = shared_file("mednist.tar.gz")
    cfg = cfg_for("mednist", path.parent, max_train_per_class=3, max_test_per_class=2)
    return cfg, DATASETS.get("mednist")(cfg, path.parent, 1993)


def test_real_mednist_classes_and_stratified_split(real_mednist):
    cfg, raw = real_mednist
    assert raw.class_names == MEDNIST_CLASSES
    assert len(raw.train) + len(raw.test) == 58954
    test_counts = torch.bincount(raw.test.labels).tolist()
    assert test_counts == [int(round(n * 0.2)) for n in MEDNIST_COUNTS]  # 20 % of every class
    assert torch.bincount(raw.train.labels).tolist() == [n - t for n, t in zip(MEDNIST_COUNTS, test_counts)]
    train_names = {s[0] for s in raw.train.sources}
    assert not train_names & {s[0] for s in raw.test.sources}
    for i in range(0, len(raw.train), 997):  # labels follow the class folder
        assert f"/{MEDNIST_CLASSES[int(raw.train.labels[i])]}/" in raw.train.sources[i][0]


def test_real_mednist_subsample_decodes_grayscale_64px(real_mednist):
    cfg, raw = real_mednist
    prepared = _prepare(raw, cfg, 1993)
    assert prepared.train.in_memory
    assert torch.bincount(prepared.train.labels).tolist() == [3] * 6
    assert torch.bincount(prepared.test.labels).tolist() == [2] * 6
    assert prepared.train.images.shape == (18, 1, 64, 64)
    assert prepared.train.images.float().std() > 10  # real images, not blanks
    again = _prepare(raw, cfg, 1993)
    assert torch.equal(prepared.train.images, again.train.images)


def test_real_breastmnist_fixture(tmp_path, shared_file):
    shutil.copyfile(shared_file("breastmnist_fixture.npz"), tmp_path / "breastmnist.npz")
    data = load_data(cfg_for("breastmnist", tmp_path), seed=1)
    assert len(data.train) == 546 and len(data.test) == 156
    assert data.class_names == ["malignant", "normal, benign"]
    assert data.train.images.shape[1:] == (1, 28, 28)
    assert data.mean == pytest.approx(channel_stats(data.train.images)[0])
    assert data.mean != pytest.approx(channel_stats(data.test.images)[0], abs=1e-6)


def test_real_pathmnist_test_subset_is_rejected(tmp_path, shared_file):
    shutil.copyfile(shared_file("pathmnist_test_subset.npz"), tmp_path / "pathmnist.npz")
    with pytest.raises(UserError) as exc:
        load_data(cfg_for("pathmnist", tmp_path, download=False), seed=1)
    assert "train_images" in str(exc.value) and "pathmnist.npz" in str(exc.value)
