"""Atomic file writes: a crash or a full disk never leaves a half-written file in place."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

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


def finite_json(obj, where: str = "", undefined: Optional[dict] = None):
    """obj with every NaN or infinite float replaced by null, and {where: why} of each one replaced:
    JSON has no NaN, and a metric that could not be computed is null with a reason, never NaN."""
    undefined = {} if undefined is None else undefined
    if isinstance(obj, float) and not math.isfinite(obj):
        undefined[where or "value"] = f"{obj} (not a finite number: a diverged model or an empty set), recorded as null"
        return None, undefined
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), undefined)[0] for k, v in obj.items()}, undefined
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]", undefined)[0] for i, v in enumerate(obj)], undefined
    return obj, undefined


def write_json_atomic(path, obj) -> None:
    """JSON (never NaN/Infinity, which no JSON reader must accept): a non-finite float becomes null and
    a mapping records why under `undefined` (path of the value -> reason)."""
    clean, undefined = finite_json(obj)
    if undefined and isinstance(clean, dict):
        clean["undefined"] = {**(clean.get("undefined") or {}), **undefined}
    write_text_atomic(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


def read_json(path, what: str, fix: str):
    """A JSON file dynammo wrote, or one UserError line: `what` names the file's role ("results.json of
    the run"), `fix` says what to do when it is damaged. NaN/Infinity (never written by dynammo) and
    nesting deeper than Python can parse are damage too."""
    path = Path(path)

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=no_constant)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; {fix}") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is damaged (not valid JSON at line {exc.lineno} column {exc.colno}: "
                        f"truncated?); {fix}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is damaged (not UTF-8 at byte {exc.start}); {fix}") from None
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UserError(f"{what} {path} is damaged ({why}); {fix}") from None


def save_torch_atomic(path, obj) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))
