"""Shared pieces of the medical-image loaders of fixed-split benchmarks (`skin7`: ISIC 2018 Task 3 /
HAM10000, `skin8`: ISIC 2019, `skin40`: SD-198, `path16`): an index of ISIC image files by id, the
official one-hot ground-truth CSVs, md5 recognition of the reference split lists, and the seeded
per-class split used when a benchmark's reference split files are absent.

Not a dataset source itself (it registers nothing). Every failure is a one-line UserError naming the
file and the fix.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from dynammo.data.datasets.files import md5sum
from dynammo.data.datasets.folder import is_image
from dynammo.errors import UserError

FALLBACK_SEED = 1993  # fixed, not the run seed: every seed of a protocol sees one split, as with fixed lists
DOWNSAMPLED = "_downsampled"  # ISIC 2019 names some MSK images ISIC_xxxxxxx_downsampled.jpg


def index_images(folders: Iterable[Path]) -> Dict[str, str]:
    """{file stem: path} of the images directly inside each folder (sorted; the first folder wins a
    stem found twice, e.g. an image in both HAM10000 parts)."""
    index: Dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and is_image(path.name) and not path.name.startswith("."):
                index.setdefault(path.stem, str(path))
    return index


def lookup(index: Dict[str, str], image_id: str) -> Optional[str]:
    """The file of an ISIC image id; `ISIC_x` and `ISIC_x_downsampled` name the same image."""
    stem = Path(image_id).stem if Path(image_id).suffix.lower() in (".jpg", ".jpeg", ".png") else image_id
    for cand in (stem, stem + DOWNSAMPLED, stem[: -len(DOWNSAMPLED)] if stem.endswith(DOWNSAMPLED) else None):
        if cand and cand in index:
            return index[cand]
    return None


def missing_text(names: Sequence[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more}"


def resolve(index: Dict[str, str], ids: Sequence[str], listed_in: Path, folders: str) -> List[str]:
    """The file of every id; the missing ones are named in one line."""
    paths = [lookup(index, i) for i in ids]
    missing = [i for i, p in zip(ids, paths) if p is None]
    if missing:
        raise UserError(f"{listed_in} names {len(missing)} image(s) not found in {folders}: {missing_text(missing)}; "
                        "add the images or point data_root at the folder holding them")
    return paths


def read_rows(path: Path) -> List[List[str]]:
    """The non-empty rows of a CSV (comma; tab for a Dataverse .tab file), cells stripped; CRLF ok."""
    delimiter = "\t" if path.suffix.lower() == ".tab" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [[c.strip() for c in row] for row in csv.reader(fh, delimiter=delimiter)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} cannot be read as a CSV ({exc.__class__.__name__}); get the file again") from exc
    rows = [r for r in rows if any(r)]
    if not rows:
        raise UserError(f"{path} is empty; get the file again")
    return rows


def read_onehot_csv(path: Path, columns: Sequence[str], classes: Sequence[str]) -> List[Tuple[str, str]]:
    """An official ISIC ground-truth CSV: header `image,<columns>`, one row per image, one-hot
    1.0/0.0 values -> [(image id, class name)] in file order. Each row must be exactly one of
    `classes` (a subset of `columns`, e.g. ISIC 2019 without its empty UNK column)."""
    rows = read_rows(path)
    header = [c.lower() for c in rows[0]]
    want = ["image"] + [c.lower() for c in columns]
    if header != want:
        raise UserError(f"{path} has header {','.join(rows[0])[:120]!r}, expected {','.join(['image', *columns])!r}; "
                        "use the official ground-truth CSV")
    out = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(want):
            raise UserError(f"{path} line {number} has {len(row)} values, expected {len(want)}; use the official file")
        try:
            hot = [j for j, v in enumerate(row[1:]) if float(v) == 1.0]
        except ValueError:
            raise UserError(f"{path} line {number} holds a value that is not 0/1: {','.join(row)[:80]!r}") from None
        if len(hot) != 1 or columns[hot[0]] not in classes:
            raise UserError(f"{path} line {number} ({row[0]}) is not labelled with exactly one of "
                            f"{', '.join(classes)}; use the official ground-truth CSV")
        out.append((row[0], columns[hot[0]]))
    if not out:
        raise UserError(f"{path} lists no images")
    return out


def seeded_class_split(files_by_class: Sequence[Sequence[str]], test_count, seed: int = FALLBACK_SEED,
                       cap: Optional[int] = None):
    """Per class (in label order, one generator for all): the files sorted, a seeded permutation, the
    first min(n, cap) of it kept, the first `test_count(k)` of those the test set, the rest train.
    -> (train paths, train labels, test paths, test labels), each class's paths sorted."""
    rng = np.random.default_rng(seed)
    tr_p, tr_l, te_p, te_l = [], [], [], []
    for label, files in enumerate(files_by_class):
        files = sorted(files)
        k = len(files) if cap is None else min(len(files), cap)
        chosen = [files[i] for i in rng.permutation(len(files))[:k]]
        n_test = test_count(k)
        test, train = sorted(chosen[:n_test]), sorted(chosen[n_test:])
        tr_p += train
        tr_l += [label] * len(train)
        te_p += test
        te_l += [label] * len(test)
    return tr_p, np.asarray(tr_l, dtype=np.int64), te_p, np.asarray(te_l, dtype=np.int64)


def list_md5_status(path: Path, reference: Tuple[str, str]) -> Optional[str]:
    """'CRLF' or 'LF' when the file is byte-identical to the reference list (as shipped, or with its
    carriage returns stripped), else None."""
    got = md5sum(path)
    if got == reference[0]:
        return "CRLF"
    if got == reference[1]:
        return "LF"
    return None
