"""Atomic file writes: a crash or a full disk never leaves a half-written file in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from dynammo.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {exc.strerror or exc}; free disk space or choose another --out") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path, write) -> None:
    """write(file handle) into a temp file beside `path`, then rename it over `path`."""
    _atomic(path, write)


def write_bytes_atomic(path, data: bytes) -> None:
    _atomic(path, lambda fh: fh.write(data))


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_torch_atomic(path, obj) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))
