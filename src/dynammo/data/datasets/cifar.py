"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009), the official "python version" files.

On disk (under `data_root`), either extracted or as the official tarball, read without extracting:
  cifar10:  `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` or `cifar-10-python.tar.gz`
  cifar100: `cifar-100-python/{train, test, meta}` or `cifar-100-python.tar.gz`
`data_root` may also be the extracted folder or the tarball itself (torchvision's layout is the same).
Each file is a pickled dict: b"data" a uint8 (N, 3072) numpy array, one image per row, channel-major
(1024 red, then green, then blue values, each 32x32 row-major); b"labels" (CIFAR-10) or
b"fine_labels" (CIFAR-100) a list of ints; the meta file holds b"label_names" / b"fine_label_names".
A missing tarball is downloaded from the official site and md5-checked (`download: false` forbids it).

Unpickling can run arbitrary code, so the files are read by an unpickler that resolves only the
numpy globals an array needs (`_reconstruct`, `ndarray`, `dtype`) and refuses every other one.

Class ids: the framework's rule is ids by sorted class name. The official names are already in
sorted order in both meta files, so the ids are the official label ids, and `shuffle: false` gives
the reference class order 0..9 / 0..99 used by the papers. (A meta file with unsorted names, which
no official file has, is remapped to sorted ids.) CIFAR-100's 20 coarse labels are not used.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from dynammo.data.datasets import DatasetShape, RawDataset, dataset
from dynammo.data.datasets.files import check_member, download_file
from dynammo.data.imageset import ImageSet
from dynammo.errors import UserError

BASE_URL = "https://www.cs.toronto.edu/~kriz/"

try:  # numpy >= 2 keeps it in numpy._core; the official files name numpy.core (an alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

# The only globals an official CIFAR pickle refers to (numpy arrays), under both numpy module names.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass(frozen=True)
class CifarSpec:
    name: str  # dataset name in the registry
    title: str  # for messages
    archive: str
    md5: str
    folder: str  # top folder inside the archive
    train_files: Tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes

    @property
    def files(self) -> Tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)

    @property
    def url(self) -> str:
        return BASE_URL + self.archive


CIFAR10 = CifarSpec("cifar10", "CIFAR-10", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                    "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                    "batches.meta", b"labels", b"label_names")
CIFAR100 = CifarSpec("cifar100", "CIFAR-100", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                     "cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays; any other global is refused before it is imported."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self.source = source

    def find_class(self, module, name):
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UserError(
                f"{self.source} asks to load {module}.{name}, which a CIFAR file never does; refused "
                "(unpickling it could run code): replace it with the official file"
            )
        return obj


def unpickle(data: bytes, source: str) -> dict:
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    except UserError:
        raise
    except Exception as exc:  # a truncated or garbled pickle raises any of a dozen exception types
        raise UserError(f"{source} is corrupt or not a CIFAR pickle ({exc.__class__.__name__}); "
                        "delete it and download it again") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{source} holds a {type(obj).__name__}, not a CIFAR dict; replace it with the official file")
    # keys are bytes in the official Python 2 pickles; accept str keys from re-pickled copies too
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


Files = Dict[str, Tuple[str, dict]]  # file name -> (where it was read from, unpickled dict)


def read_folder(folder: Path, spec: CifarSpec) -> Files:
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{spec.title} folder {folder} lacks {', '.join(missing)}; extract {spec.archive} "
                        f"again (from {spec.url}) or delete the folder and keep the tarball in its parent")
    return {f: (str(folder / f), unpickle((folder / f).read_bytes(), str(folder / f))) for f in spec.files}


def read_archive(path: Path, spec: CifarSpec) -> Files:
    """The needed members of the tarball, read in one pass without extracting it."""
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                check_member(path, member.name, spec.title)
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 2 and parts[-2] == spec.folder and parts[-1] in spec.files:
                    source = f"{path}:{spec.folder}/{parts[-1]}"
                    out[parts[-1]] = (source, unpickle(tar.extractfile(member).read(), source))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UserError(f"archive {path} is corrupt or truncated ({exc.__class__.__name__}); "
                        f"delete it and download {spec.url} again") from exc
    missing = [f for f in spec.files if f not in out]
    if missing:
        raise UserError(f"archive {path} lacks {', '.join(f'{spec.folder}/{f}' for f in missing)}; "
                        f"it is not the official {spec.archive}: download {spec.url} again")
    return out


def download(spec: CifarSpec, root: Path) -> Path:
    return download_file(spec.url, root / spec.archive, spec.md5, spec.title)


def read_files(spec: CifarSpec, root: Path, allow_download: bool) -> Files:
    """The unpickled files, from (in this order) an extracted folder, the tarball, or a download."""
    if root.is_file():
        return read_archive(root, spec)
    for folder in (root / spec.folder, root):
        if (folder / spec.meta_file).is_file() and (folder / spec.test_file).is_file():
            return read_folder(folder, spec)
    if (root / spec.folder).is_dir():
        return read_folder(root / spec.folder, spec)  # names the missing files
    if (root / spec.archive).is_file():
        return read_archive(root / spec.archive, spec)
    if not allow_download:
        raise UserError(
            f"{spec.title} not found: expected {root / spec.archive} or the extracted {root / spec.folder}/; "
            f"download {spec.url} (md5 {spec.md5}) into {root}, or set data_root to the folder that holds it"
        )
    return read_archive(download(spec, root), spec)


def class_names(meta: dict, spec: CifarSpec, source: str) -> List[str]:
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{source} has no {spec.names_key.decode()} list; it is not the {spec.title} meta file")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if len(set(names)) != len(names):
        raise UserError(f"{source} lists a class name twice; it is not the {spec.title} meta file")
    return names


def to_arrays(batch: dict, spec: CifarSpec, source: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get(b"data"), batch.get(spec.label_key)
    if data is None or labels is None:
        raise UserError(f"{source} lacks b'data' or {spec.label_key!r}; it is not a {spec.title} batch file")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{source} data must be uint8 (N, 3072), got {data.dtype} {data.shape}; "
                        f"it is not a {spec.title} batch file")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source} {spec.label_key.decode()} are not integers; it is not a {spec.title} batch file") from exc
    if labels.shape != (len(data),):
        raise UserError(f"{source} has {len(data)} images but {labels.size} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise UserError(f"{source} has label {int(bad[0])}, but the meta file names {num_classes} classes; "
                        f"the files are not all {spec.title}")
    return data, labels


def load_cifar(spec: CifarSpec, cfg, root: Path) -> RawDataset:
    files = read_files(spec, Path(root), bool(cfg.get("download", True)))
    names = class_names(files[spec.meta_file][1], spec, files[spec.meta_file][0])
    # official label id -> id by sorted name (the identity for the official files)
    sorted_id = {n: i for i, n in enumerate(sorted(names))}
    to_sorted = np.array([sorted_id[n] for n in names], dtype=np.int64)

    def part(file_names) -> ImageSet:
        arrays = [to_arrays(files[f][1], spec, files[f][0], len(names)) for f in file_names]
        data = np.concatenate([a for a, _ in arrays])
        labels = np.concatenate([y for _, y in arrays])
        images = torch.from_numpy(data.reshape(len(data), 3, 32, 32))  # rows are channel-major already
        return ImageSet(torch.from_numpy(to_sorted[labels]), images=images)

    return RawDataset(spec.name, sorted(names), part(spec.train_files), part((spec.test_file,)), flip=True)


for _spec in (CIFAR10, CIFAR100):
    dataset(_spec.name, f"data_root/{_spec.archive} or data_root/{_spec.folder}/ (downloaded when missing)",
            shape=DatasetShape(100 if _spec is CIFAR100 else 10, 3, 32))(
        lambda cfg, root, seed, spec=_spec: load_cifar(spec, cfg, root))
