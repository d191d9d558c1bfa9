"""Shared fixtures: configs, tiny generated image files in each dataset's on-disk layout, the real
data of ../shared/data (tests that need it skip when it is absent), the ways a test runs dynammo
(in this process, as a subprocess, under torchrun) and the test tiers they imply."""
from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
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

from dynammo.configure import build_config

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- tiers

# A test's tier follows from what it uses, so that no test runs a subprocess or a training in the
# `unit` tier unnoticed: the fixtures in its closure, and the names that its own code, its fixtures'
# code and the test-suite functions they call refer to (`subprocess` in a module-level helper; an
# entry point that trains: method_helpers.run_task, Engine.fit, run_single, a Pretraining). The
# heaviest tier wins. Where neither tells (a subprocess started inside the code under test), the test
# or its module carries the tier's marker.
TIERS = ("unit", "contract", "e2e", "distributed")  # lightest first
TIER_OF_FIXTURE = {
    "torchrun": "distributed", "spawn_processes": "distributed",
    "cli": "e2e", "shared_data": "e2e",  # the real data of ../shared/data: whole datasets read
    "run_in_process": "contract",
}
# the subprocess module, and the entry points that train in this process
TIER_OF_NAME = {"subprocess": "e2e", "run_task": "contract", "run_single": "contract", "resume_run": "contract",
                "Pretraining": "contract", "fit": "contract",
                # test_sweep's helper calls `dynammo sweep` in this process, which starts its runs as subprocesses
                "sweep_in_process": "e2e"}
TESTS_DIR = str(Path(__file__).resolve().parent)


def names_reached(func, seen: set) -> set:
    """The global and attribute names that `func` and the tests/ functions it refers to use."""
    func = getattr(func, "__wrapped__", func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen or not code.co_filename.startswith(TESTS_DIR):
        return set()
    seen.add(code)
    names, stack = set(), [code]
    while stack:  # nested functions, lambdas and comprehensions are constants of their code object
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    for name in list(names):
        target = func.__globals__.get(name)
        if callable(target) and hasattr(target, "__code__"):
            names |= names_reached(target, seen)
    return names


def tier_of(item) -> str:
    tiers = {TIER_OF_FIXTURE[f] for f in item.fixturenames if f in TIER_OF_FIXTURE}
    seen = set()
    names = names_reached(item.function, seen) if hasattr(item, "function") else set()
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for fixturedef in defs:
            names |= names_reached(fixturedef.func, seen)
    tiers |= {TIER_OF_NAME[n] for n in names if n in TIER_OF_NAME}
    tiers |= {m.name for m in item.iter_markers() if m.name in TIERS}
    return max(tiers, key=TIERS.index, default="unit")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        others = [t for t in TIERS if t != tier and item.get_closest_marker(t)]
        if others:
            raise pytest.UsageError(f"{item.nodeid} is marked {others[0]} but is in the {tier} tier by what it uses")
        if not item.get_closest_marker(tier):
            item.add_marker(tier)


# ---------------------------------------------------------------- data, configs, threads


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


@pytest.fixture(scope="module")
def single_thread_module():
    """single_thread for a whole module (hypothesis refuses function-scoped fixtures under @given)."""
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


# ---------------------------------------------------------------- running dynammo


class Cli:
    """`python -m dynammo ...` (or another Python entry point) in a subprocess from the repository
    root, with the suite's environment: offline, unbuffered, one thread per subprocess (tiny networks
    gain nothing from two, and two stall when the cores are shared)."""

    root = ROOT

    @staticmethod
    def env(**extra) -> dict:
        return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)

    def __call__(self, *args, **kw) -> subprocess.CompletedProcess:
        """`dynammo *args`, waited for; kw as in python()."""
        return self.python("-m", "dynammo", *args, **kw)

    def python(self, *argv, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
        """`python *argv`, waited for, its output captured as text."""
        return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                              cwd=cwd or ROOT, env=env or self.env(), timeout=timeout)

    def popen(self, *argv, env=None, **kw) -> subprocess.Popen:
        """`python *argv` started, its output piped as text (kw: more Popen arguments)."""
        return subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env or self.env(), **kw)


@pytest.fixture(scope="session")
def cli() -> Cli:
    """The subprocess runner (Cli); a test that uses it is in the `e2e` tier."""
    return Cli()


@pytest.fixture(scope="session")
def torchrun(cli):
    """torchrun(procs, *argv, **popen_kw) -> `python -m torch.distributed.run --standalone
    --nproc-per-node=procs *argv` started (plain `python *argv` for one process), in its own
    session so that a signal can reach every rank; a test that uses it is `distributed`."""

    def start(procs: int, *argv, **kw) -> subprocess.Popen:
        head = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
        return cli.popen(*head, *argv, start_new_session=True, **kw)

    return start


@pytest.fixture(scope="session")
def spawn_processes():
    """spawn_processes(worker, args, nprocs): torch.multiprocessing.spawn, joined; `distributed`."""
    import torch.multiprocessing as mp

    def spawn(worker, args, nprocs: int) -> None:
        mp.spawn(worker, args=args, nprocs=nprocs, join=True)

    return spawn


@pytest.fixture(scope="session")
def run_in_process():
    """run_in_process(*argv) -> the exit status of `dynammo *argv` run in this process on one
    thread (a training: a test that uses it is in the `contract` tier)."""
    from dynammo.cli import main
    from method_helpers import one_thread

    def run(*argv) -> int:
        with one_thread():
            return main([str(a) for a in argv])

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, run_in_process):
    """tiny_run(method) -> the run directory of a real `dynammo run` (in this process, one thread) of
    `method` at method_helpers.TINY_RUN size; one run per method per session, shared by every test
    that reads it (the contract tests and the methods' end-to-end tests). Treat it as read-only."""
    from method_helpers import tiny_run_args

    runs = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp("tiny_runs") / name
            rc = run_in_process("run", "--out", out, *tiny_run_args(name))
            assert rc == 0, f"`dynammo run` of {name} failed (exit status {rc}); see the captured output"
            runs[name] = out
        return runs[name]

    return get


@pytest.fixture(scope="session")
def runs(run_in_process, tmp_path_factory):
    """Real runs for the report tests (tests/test_report_*.py), made once: root/cmp/{finetune,replay}:
    seed lists [0, 1]; root/other/finetune: seed 0 with max_train_per_class=10. Read-only."""
    from method_helpers import tiny_run_args

    root = tmp_path_factory.mktemp("report_runs")
    for out, name, kw in [(root / "cmp" / "finetune", "finetune", {"seed": "[0,1]"}),
                          (root / "cmp" / "replay", "replay", {"seed": "[0,1]"}),
                          (root / "other" / "finetune", "finetune", {"max_train_per_class": 10})]:
        assert run_in_process("run", "--out", out, *tiny_run_args(name, **kw)) == 0
    return root


@pytest.fixture(scope="session")
def report(cli, runs, tmp_path_factory):
    """(folder, process) of the full report of both `runs` folders, as `dynammo report` writes it."""
    out = tmp_path_factory.mktemp("reports") / "report"
    proc = cli("report", str(runs / "cmp"), str(runs / "other"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


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
