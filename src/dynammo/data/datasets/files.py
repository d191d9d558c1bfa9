"""Shared pieces of the dataset loaders that read a dataset's real on-disk layout: finding its top
folder under `data_root`, split-list files, md5 checks, downloads, the documented class count.

Every failure is a UserError of one line that names the file and the fix.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from dynammo.errors import UserError


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: Path, expected: Optional[str], source: str) -> None:
    """A file whose md5 is known must match it; the fix names where a good copy comes from."""
    if expected is None:
        return
    got = md5sum(path)
    if got != expected:
        raise UserError(f"{path} has md5 {got}, expected {expected}: it is corrupt or not the official file; "
                        f"delete it and get it again from {source}")


def download_file(url: str, dest: Path, md5: Optional[str], title: str) -> Path:
    """Download via a temp file beside `dest`, check the md5 (when known), then move it into place:
    an interrupted download never leaves a half-written file under the real name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as exc:
            md5_txt = f" (md5 {md5})" if md5 else ""
            raise UserError(f"{title} not found in {dest.parent} and could not be downloaded ({exc.__class__.__name__}); "
                            f"download {url}{md5_txt} into {dest.parent}") from exc
        if md5 is not None and md5sum(Path(tmp)) != md5:
            raise UserError(f"downloaded {dest.name} has the wrong md5 (expected {md5}); try the download again")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def locate(root: Path, top_names: Sequence[str], marker: str, title: str, expected: str) -> Path:
    """The dataset's top folder: `data_root/<top>` for one of its usual names, or `data_root` itself
    when it is the top folder. `marker` (a relative path) must exist inside it."""
    root = Path(root)
    for cand in [root / t for t in top_names] + [root]:
        if (cand / marker).exists():
            return cand
    raise UserError(f"{title} not found under {root}: expected {expected}; set data_root to the folder that holds "
                    f"{top_names[0]}/ (or to {top_names[0]}/ itself)")


def first_existing(folder: Path, names: Iterable[str]) -> Optional[Path]:
    return next((folder / n for n in names if (folder / n).exists()), None)


def read_split_list(path: Path, base: Path) -> List[Tuple[str, int]]:
    """A split list of `<relative path> <integer label>` lines, as CL_Pytorch's SKIN8/SKIN40/ImageNet-100
    lists: CRLF or LF, blank lines skipped, a leading '/' on the path ignored, paths relative to `base`.
    Every listed file must exist (the first missing ones are named)."""
    if not path.is_file():
        raise UserError(f"split list {path} does not exist; put the list file there or remove the folder it "
                        "should be in to use the seeded fallback split")
    rows, missing = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{path} line {number} must be '<relative path> <integer label>', got {line[:80]!r}")
        rel = parts[0].lstrip("/")
        full = base / rel
        if not full.is_file():
            missing.append(rel)
        rows.append((str(full), int(parts[1])))
    if not rows:
        raise UserError(f"split list {path} lists no images")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{path} lists {len(missing)} file(s) that do not exist under {base}: "
                        f"{', '.join(missing[:3])}{more}; point data_root at the folder holding them")
    return rows


def check_class_count(title: str, found: int, expected: int, where: Path) -> None:
    """A dataset with a documented class count must have exactly that many (a partial copy or a
    wrong folder would otherwise train on a different benchmark without a word)."""
    if found != expected:
        raise UserError(f"{title} at {where} has {found} classes, but {title} has {expected}; "
                        "the copy is incomplete or it is another dataset: check the folder")
