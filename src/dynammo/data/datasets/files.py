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


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


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


def read_list_lines(path: Path, missing_hint: str = "put the list file there") -> List[Tuple[str, int]]:
    """The `<relative path> <integer label>` lines of a split list as CL_Pytorch's SKIN8/SKIN40/ImageNet-100
    lists are written: CRLF or LF, blank lines skipped; the paths as written (not resolved)."""
    if not path.is_file():
        raise UserError(f"split list {path} does not exist; {missing_hint}")
    rows = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{path} line {number} must be '<relative path> <integer label>', got {line[:80]!r}")
        rows.append((parts[0], int(parts[1])))
    if not rows:
        raise UserError(f"split list {path} lists no images")
    return rows


def read_split_list(path: Path, base: Path) -> List[Tuple[str, int]]:
    """A split list's (file, label) rows with the paths resolved under `base` (a leading '/' ignored).
    Every listed file must exist (the first missing ones are named)."""
    rows = read_list_lines(path, "put the list file there or remove the folder it should be in to use the "
                                 "seeded fallback split")
    resolved = [(base / rel.lstrip("/"), label) for rel, label in rows]
    missing = [rel.lstrip("/") for (rel, _), (full, _) in zip(rows, resolved) if not full.is_file()]
    if missing:
        raise missing_files_error(path, missing, base)
    return [(str(full), label) for full, label in resolved]


def check_class_count(title: str, found: int, expected: int, where: Path) -> None:
    """A dataset with a documented class count must have exactly that many (a partial copy or a
    wrong folder would otherwise train on a different benchmark without a word)."""
    if found != expected:
        raise UserError(f"{title} at {where} has {found} classes, but {title} has {expected}; "
                        "the copy is incomplete or it is another dataset: check the folder")


def obtain_archive(root: Path, name: str, url: str, md5: Optional[str], title: str, allow_download: bool,
                   expected: str) -> Path:
    """The official archive `root/<name>`: md5-checked when present, else downloaded (when allowed).
    `expected` says which extracted layout was looked for (named in the not-found error)."""
    path = Path(root) / name
    if path.is_file():
        verify_md5(path, md5, url)
        return path
    if not allow_download:
        md5_txt = f" (md5 {md5})" if md5 else ""
        raise UserError(f"{title} not found under {root}: expected {expected} or {path}; download {url}{md5_txt} "
                        f"into {root} (download: false forbids fetching it), or set data_root to the folder holding it")
    return download_file(url, path, md5, title)


def _unsafe_member(name: str) -> bool:
    parts = Path(name.replace("\\", "/")).parts
    return name.startswith(("/", "\\")) or ".." in parts or (len(parts) > 0 and ":" in parts[0])


def check_member(archive, name: str, title: str) -> None:
    """Every archive reader (extracting or reading in place) refuses a member whose path climbs out
    ('..'), is absolute or names a drive: its folder names would become classes like '..'."""
    if _unsafe_member(name):
        raise UserError(f"archive {archive} holds a member outside its folder ({name[:200]!r}); refused: get the "
                        f"official {title} archive again")


def extract_archive(archive: Path, dest: Path, title: str) -> None:
    """Extract a .tar[.gz] / .tgz / .zip into `dest`, refusing members that would land outside it
    (absolute paths, '..', links pointing out, devices). Extraction goes to a hidden temporary folder
    inside `dest` first, so an interrupted run never leaves a half-extracted folder that looks whole;
    a top-level folder that already exists is an error (delete it), a loose top-level file is replaced."""
    import shutil
    import tarfile
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.extract.", dir=dest))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf:
                    for n in zf.namelist():
                        check_member(archive, n, title)
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive, "r:*") as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp, filter="data")
                    else:  # Python without extraction filters: check every member first
                        for m in tar.getmembers():
                            if _unsafe_member(m.name) or not (m.isfile() or m.isdir()):
                                raise UserError(f"archive {archive} holds an unsafe member ({m.name!r}); "
                                                f"refused: get the official {title} archive again")
                        tar.extractall(tmp)
        except UserError:
            raise
        except Exception as exc:  # tarfile.FilterError, TarError, BadZipFile, EOFError, zlib.error, OSError
            if isinstance(exc, OSError) and exc.errno is not None:  # writing failed (disk full, permissions)
                raise UserError(f"extracting {archive} into {dest} failed ({exc}); free disk space or extract "
                                "it by hand") from exc
            raise UserError(f"archive {archive} is corrupt, truncated or unsafe ({exc.__class__.__name__}: {exc}); "
                            f"delete it and get the official {title} archive again") from exc
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.is_dir() or (target.exists() and entry.is_dir()):
                raise UserError(f"{target} already exists but is not a complete {title} copy; delete it so "
                                f"{archive.name} can be extracted again")
            os.replace(entry, target)  # a loose top-level file (CUB's attributes.txt) is replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def missing_files_error(listing: Path, missing: Sequence[str], base: Path) -> UserError:
    """The error for a list naming files that do not exist (the first three are named)."""
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return UserError(f"{listing} lists {len(missing)} file(s) that do not exist under {base}: "
                     f"{', '.join(missing[:3])}{more}; point data_root at the folder holding them")
