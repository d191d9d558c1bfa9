"""Shared fixtures: configs, tiny generated image files in each dataset's on-disk layout, and the
real data of ../shared/data (tests that need it skip when it is absent)."""
from __future__ import annotations

import io
import os
import pathlib
import tarfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network (timm / huggingface hub)
# amp/memory_format auto = the fp32 NCHW path on every machine (CPUs with bf16 units included), so the
# exact-numerics tests (bitwise resume, hand-computed values) run alike; subprocesses inherit it.
# tests/test_compute.py monkeypatches the probe to test both sides.
os.environ["DYNAMMO_CPU_BF16"] = "0"

import numpy as np
import pytest
from PIL import Image

from dynammo.config import build_config


def _shared_data_dir() -> Path:
    env = os.environ.get("DYNAMMO_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $DYNAMMO_SHARED_DATA); skips the test when the folder is missing."""
    root = _shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent (set DYNAMMO_SHARED_DATA to the folder holding "
                    "mednist.tar.gz and the MedMNIST fixtures)")
    return root


@pytest.fixture(scope="session")
def shared_file(shared_data):
    """shared_file(name) -> path of a real data file; skips the test when it is absent."""

    def get(name: str) -> Path:
        path = shared_data / name
        if not path.is_file():
            pytest.skip(f"real data file {path} is absent")
        return path

    return get


@pytest.fixture
def single_thread():
    """Run a test's tensor ops on one thread (method_helpers.one_thread)."""
    from method_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture
def make_cfg():
    """make_cfg(key=value, ...) -> a validated Config on top of the framework defaults."""

    def make(**kw):
        return build_config(kw)

    return make


# ---------------------------------------------------------------- image files


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, arr: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr, fmt))
    return path


def const_image(value: int, size: int = 8, rgb: bool = False) -> np.ndarray:
    """A constant image whose pixel value tells which class/sample it is."""
    shape = (size, size, 3) if rgb else (size, size)
    return np.full(shape, value, dtype=np.uint8)


@pytest.fixture
def image_tools():
    """Helpers to write images: .png_bytes(arr), .write(path, arr), .const(value, size, rgb)."""

    class Tools:
        png_bytes = staticmethod(png_bytes)
        write = staticmethod(write_image)
        const = staticmethod(const_image)

    return Tools


@pytest.fixture
def mednist_tree(tmp_path):
    """A tiny MedNIST-like tree `<top>/<Class>/<n>.jpeg` plus the same files as a .tar.gz.

    make(top, classes, per_class, seed) -> (archive path, extracted folder holding `top`).
    Every image is random noise (JPEG-encoded), so comparing decoded images is meaningful.
    """

    def make(top: str = "resized", classes=("HeadCT", "AbdomenCT", "Hand"), per_class: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        extracted = tmp_path / "extracted"
        archive = tmp_path / "archive" / "mednist.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            for cls in classes:  # deliberately not in sorted order
                for i in range(per_class):
                    data = png_bytes(rng.integers(0, 256, (16, 16), dtype=np.uint8), "JPEG")
                    rel = f"{top}/{cls}/{i:06d}.jpeg"
                    (extracted / rel).parent.mkdir(parents=True, exist_ok=True)
                    (extracted / rel).write_bytes(data)
                    info = tarfile.TarInfo(rel)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return archive, extracted

    return make


# ---------------------------------------------------------------- MedMNIST npz files


def medmnist_arrays(n_classes: int, per_class=(3, 1, 2), size: int = 28, rgb: bool = False, seed: int = 0):
    """Arrays in MedMNIST layout: {split}_images (N,H,W[,3]) uint8, {split}_labels (N,1) uint8.
    Every class appears `per_class[k]` times in split k (train, val, test)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "val", "test"), per_class):
        labels = np.repeat(np.arange(n_classes), n).astype(np.uint8)
        shape = (len(labels), size, size, 3) if rgb else (len(labels), size, size)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = labels[:, None]
    return out


@pytest.fixture
def write_npz():
    """write_npz(path, n_classes, **kw) -> (path, arrays): a MedMNIST-format .npz."""

    def write(path: Path, n_classes: int, **kw):
        arrays = medmnist_arrays(n_classes, **kw)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return path, arrays

    return write


# ---------------------------------------------------------------- shared real runs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(method) -> the run directory of a real `dynammo run` (in this process, one thread) of
    `method` at method_helpers.TINY_RUN size; one run per method per session, shared by every test
    that reads it (the contract tests and the methods' end-to-end tests). Treat it as read-only."""
    from dynammo.cli import main
    from method_helpers import one_thread, tiny_run_args

    runs = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp("tiny_runs") / name
            with one_thread():
                rc = main(["run", "--out", str(out), *tiny_run_args(name)])
            assert rc == 0, f"`dynammo run` of {name} failed (exit status {rc}); see the captured output"
            runs[name] = out
        return runs[name]

    return get


# ---------------------------------------------------------------- unsorted directory listings


class ReversedScandir:
    """os.scandir's iterator, in reverse name order (a context manager as the real one)."""

    def __init__(self, entries):
        self.entries = sorted(entries, key=lambda e: e.name, reverse=True)

    def __iter__(self):
        return iter(self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def reversed_listing(monkeypatch):
    """Directory listings (Path.iterdir, os.listdir, os.scandir) come back in reverse order, as an
    unsorted listing may."""
    original_iterdir, original_scandir, original_listdir = pathlib.Path.iterdir, os.scandir, os.listdir

    def iterdir(self):
        return iter(sorted(original_iterdir(self), reverse=True))

    def scandir(path="."):
        with original_scandir(path) as it:
            return ReversedScandir(list(it))

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", lambda path=".": sorted(original_listdir(path), reverse=True))
