"""CIFAR-10 / CIFAR-100 on generated files in the official on-disk layout: Python 2 protocol-2 pickles
(byte-string keys, numpy arrays via numpy.core.multiarray._reconstruct), extracted and as the tarball."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dynammo.configure import build_config
from dynammo.data import load_data
from dynammo.data.datasets import DATASETS
from dynammo.data.datasets.cifar import CIFAR10, CIFAR100
from dynammo.data.scenario import Scenario
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]

# The official meta files' names, in their label-id order.
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: every str as a byte string
    (SHORT_BINSTRING / BINSTRING, read back as bytes with encoding="bytes") and numpy's globals
    under their numpy 1.x names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + struct.pack("<B", len(data)) if len(data) < 256 \
            else pickle.BINSTRING + struct.pack("<i", len(data))
        self.write(head + data)
        self.memoize(obj)

    def save_numpy_global(self, obj, name=None):
        if obj in (np.ndarray, np.dtype):
            module = "numpy"
        elif getattr(obj, "__name__", "") == "_reconstruct":
            module = "numpy.core.multiarray"
        else:
            return pickle._Pickler.save_global(self, obj, name)
        self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str
    dispatch[type] = save_numpy_global
    dispatch[type(np.ndarray.__reduce__(np.zeros(1))[0])] = save_numpy_global  # builtin _reconstruct


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def make_cifar(spec, names, per_class_train, per_class_test, seed=0):
    """{file name: pickle bytes} in the official layout, and the (images (N,3,32,32), labels) per split."""
    rng = np.random.default_rng(seed)

    def split(per_class):
        labels = np.tile(np.arange(len(names)), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
        return images, labels

    train, test = split(per_class_train), split(per_class_test)
    label_key = spec.label_key.decode()

    def batch(images, labels, tag):
        d = {"batch_label": tag, "data": images.reshape(len(images), 3072), label_key: labels.tolist(),
             "filenames": [f"img_{i:05d}.png" for i in range(len(labels))]}
        if spec is CIFAR100:
            d["coarse_labels"] = [int(y) // 5 for y in labels]
        return py2_pickle(d)

    files = {spec.test_file: batch(*test, "testing batch 1 of 1")}
    chunks = np.array_split(np.arange(len(train[1])), len(spec.train_files))
    for name, idx in zip(spec.train_files, chunks):
        files[name] = batch(train[0][idx], train[1][idx], f"training batch {name}")
    meta = {spec.names_key.decode(): list(names)}
    meta.update({"num_cases_per_batch": len(chunks[0]), "num_vis": 3072} if spec is CIFAR10
                else {"coarse_label_names": [f"super{i}" for i in range(20)]})
    files[spec.meta_file] = py2_pickle(meta)
    return files, {"train": train, "test": test}


def write_extracted(root: Path, spec, files) -> Path:
    folder = root / spec.folder
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_tarball(root: Path, spec, files, extra=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / spec.archive
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [*files.items(), *extra]:
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def raw_load(dataset, root, **kw):
    cfg = build_config({"dataset": dataset, "data_root": str(root), **kw})
    return DATASETS.get(dataset)(cfg, Path(root), 1)


@pytest.fixture(scope="module")
def cifar10_files():
    return make_cifar(CIFAR10, CIFAR10_NAMES, per_class_train=5, per_class_test=2)


def assert_round_trip(raw, truth, names):
    assert raw.class_names == names and raw.flip
    for part, key in ((raw.train, "train"), (raw.test, "test")):
        images, labels = truth[key]
        assert part.in_memory and part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert torch.equal(part.images, torch.from_numpy(images))
        assert part.labels.tolist() == labels.tolist()


def test_official_names_are_sorted_so_ids_are_the_official_label_ids():
    assert sorted(CIFAR10_NAMES) == CIFAR10_NAMES and len(CIFAR10_NAMES) == 10
    assert sorted(CIFAR100_NAMES) == CIFAR100_NAMES and len(set(CIFAR100_NAMES)) == 100


def test_cifar10_tarball_folder_and_paths_round_trip(tmp_path, cifar10_files):
    files, truth = cifar10_files
    # protocol 2, byte-string keys, numpy 1.x globals: what the official Python 2 pickles hold
    assert files["data_batch_1"].startswith(b"\x80\x02}") and b"U\x04data" in files["data_batch_1"]
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in files["data_batch_1"]
    archive = write_tarball(tmp_path / "tar", CIFAR10, files, extra=[("readme.html", b"<html></html>")])
    folder = write_extracted(tmp_path / "dir", CIFAR10, files)
    for root in (archive.parent, archive, folder.parent, folder):  # data_root: holder, tarball, folder
        assert_round_trip(raw_load("cifar10", root, download=False), truth, CIFAR10_NAMES)


def test_cifar100_round_trip_and_reference_class_order(tmp_path):
    files, truth = make_cifar(CIFAR100, CIFAR100_NAMES, per_class_train=2, per_class_test=1, seed=3)
    write_tarball(tmp_path, CIFAR100, files)
    raw = raw_load("cifar100", tmp_path, download=False)
    assert_round_trip(raw, truth, CIFAR100_NAMES)
    # shuffle=false, 10x10: task t holds the official label ids 10t..10t+9 under their real names
    cfg = build_config({"dataset": "cifar100", "data_root": str(tmp_path), "shuffle": False,
                        "init_cls": 10, "increment": 10, "normalize": "none"})
    data = load_data(cfg, seed=1993)
    scenario = Scenario.from_config(data, cfg, 1993)
    assert scenario.classes_of_tasks() == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    assert scenario.class_names == CIFAR100_NAMES
    assert torch.equal(scenario.train.labels, torch.from_numpy(truth["train"][1]))


def test_unsorted_meta_names_are_remapped_to_sorted_ids(tmp_path):
    names = ["zebra", "apple", "mango"]
    files, truth = make_cifar(CIFAR10, names, per_class_train=2, per_class_test=1)
    write_extracted(tmp_path, CIFAR10, files)
    raw = raw_load("cifar10", tmp_path, download=False)
    assert raw.class_names == ["apple", "mango", "zebra"]
    remap = {0: 2, 1: 0, 2: 1}
    assert raw.train.labels.tolist() == [remap[int(y)] for y in truth["train"][1]]
    assert torch.equal(raw.train.images, torch.from_numpy(truth["train"][0]))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, cifar10_files, monkeypatch):
    files, _ = cifar10_files
    monkeypatch.chdir(tmp_path)
    bad = dict(files, data_batch_3=py2_pickle({"data": Evil()}))
    folder = write_extracted(tmp_path / "dir", CIFAR10, bad)
    with pytest.raises(UserError) as exc:
        raw_load("cifar10", folder.parent, download=False)
    msg = str(exc.value)
    assert str(folder / "data_batch_3") in msg and "system" in msg and "refused" in msg
    archive = write_tarball(tmp_path / "tar", CIFAR10, bad)
    with pytest.raises(UserError, match="data_batch_3.*refused"):
        raw_load("cifar10", archive, download=False)
    assert not (tmp_path / "pwned").exists()
    # any other global is refused too, also one that would be harmless
    files_np = dict(files, test_batch=py2_pickle({"data": np.float32(1.0)}))
    write_extracted(tmp_path / "dir2", CIFAR10, files_np)
    with pytest.raises(UserError, match="numpy.*scalar.*refused"):
        raw_load("cifar10", tmp_path / "dir2", download=False)


def test_missing_dataset_names_file_url_and_root(tmp_path, monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("download=false must not download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError) as exc:
        raw_load("cifar100", tmp_path, download=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(tmp_path / "cifar-100-python.tar.gz") in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg and CIFAR100.md5 in msg


def test_download_offline_and_md5(tmp_path, monkeypatch, cifar10_files):
    calls = []

    def offline(url, filename=None, *a, **kw):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    root = tmp_path / "new"
    with pytest.raises(UserError) as exc:
        raw_load("cifar10", root)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert calls[0] in str(exc.value) and str(root) in str(exc.value) and CIFAR10.md5 in str(exc.value)
    assert list(root.iterdir()) == []  # no half-written file left behind

    archive = write_tarball(tmp_path / "src", CIFAR10, cifar10_files[0])
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, filename, *a, **kw: shutil.copyfile(archive, filename))
    with pytest.raises(UserError, match="md5"):  # not the official bytes
        raw_load("cifar10", root)
    assert list(root.iterdir()) == []
    monkeypatch.setattr("dynammo.data.datasets.files.md5sum", lambda path: CIFAR10.md5)
    raw = raw_load("cifar10", root)
    assert (root / CIFAR10.archive).is_file() and len(raw.train) == 50


def test_incomplete_or_corrupt_files(tmp_path, cifar10_files):
    files, _ = cifar10_files
    folder = write_extracted(tmp_path / "dir", CIFAR10, {k: v for k, v in files.items() if k != "data_batch_4"})
    with pytest.raises(UserError, match="lacks data_batch_4"):
        raw_load("cifar10", folder.parent, download=False)
    archive = write_tarball(tmp_path / "tar", CIFAR10, {k: v for k, v in files.items() if k != "batches.meta"})
    with pytest.raises(UserError, match="lacks cifar-10-batches-py/batches.meta"):
        raw_load("cifar10", archive.parent, download=False)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        raw_load("cifar10", archive.parent, download=False)
    write_extracted(tmp_path / "trunc", CIFAR10, dict(files, test_batch=files["test_batch"][:-500]))
    with pytest.raises(UserError, match="test_batch is corrupt"):
        raw_load("cifar10", tmp_path / "trunc", download=False)
    wrong = py2_pickle({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]})
    write_extracted(tmp_path / "float", CIFAR10, dict(files, data_batch_2=wrong))
    with pytest.raises(UserError, match="uint8"):
        raw_load("cifar10", tmp_path / "float", download=False)
    label = py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [10]})
    write_extracted(tmp_path / "label", CIFAR10, dict(files, data_batch_2=label))
    with pytest.raises(UserError, match="label 10"):
        raw_load("cifar10", tmp_path / "label", download=False)


def test_cli_run_on_cifar10_fixture(cli, tmp_path, cifar10_files):
    write_tarball(tmp_path / "data", CIFAR10, cifar10_files[0])
    out = tmp_path / "run"
    proc = cli("run", "method=finetune", "dataset=cifar10", f"data_root={tmp_path / 'data'}", "download=false",
               "backbone=resnet20", "epochs=1", "batch_size=16", "init_cls=2", "increment=4", "shuffle=false",
               "save_checkpoints=false", "progress=false", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["dataset"] == "cifar10"
    assert r["class_names"] == CIFAR10_NAMES and r["tasks"] == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert len(r["acc"]) == 3 and all(0 <= a <= 100 for a in r["acc"])
