"""A CSV of `path,label` rows (header optional); paths relative to the CSV's folder.

`data_root` is the CSV file, or a folder holding `train.csv` and `test.csv` (split kept) or one
`labels.csv` (seeded stratified split). Split file names are recognised in any case as the folder
loader's: train|training, test|testing, val|valid|validation (.csv); with train and val but no test,
val is the test split; with all three, val is not used; test or val without train is an error; train
alone gets a seeded stratified split. Labels may be names or integers; ids follow sorted names.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from dynammo.data.datasets import RawDataset, dataset
from dynammo.data.datasets.folder import by_split_role, choose_splits, guess_channels, split_sources
from dynammo.data.imageset import ImageSet
from dynammo.config import shown
from dynammo.errors import UserError


def read_rows(path: Path):
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist; set data_root to a CSV of path,label rows")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UserError(f"CSV file {path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"CSV file {path} is not UTF-8 text (line {line}, byte {exc.start}); save it as UTF-8") from None
    if "\0" in text:
        raise UserError(f"CSV file {path} holds NUL characters (UTF-16 or not a CSV?); save it as UTF-8 text")
    reader = csv.reader(io.StringIO(text, newline=""))
    i = 0
    try:
        for i, row in enumerate(reader):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2:
                raise UserError(f"{path} line {i + 1} must be path,label; got {shown(row)}")
            if i == 0 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            p = Path(row[0].strip())
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise UserError(f"{path} line {i + 1}: image {shown(str(p))} does not exist; fix the path")
            rows.append((str(p), row[1].strip()))
    except csv.Error as exc:  # a field past csv's size limit, an unclosed quote at the end
        raise UserError(f"{path} line {i + 2} is not a path,label row ({exc}); fix the CSV") from None
    except OSError as exc:  # a path too long for the file system
        raise UserError(f"{path} line {i + 1}: {exc.strerror or exc}; fix the path") from None
    if not rows:
        raise UserError(f"CSV file {path} lists no images")
    return rows


def sort_key(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def split_files(root: Path) -> dict:
    """{role: [file names]} of the split CSVs directly in `root` (train.csv, Testing.CSV, valid.csv, ...)."""
    found = by_split_role(sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv"))
    return found


@dataset("csv", "a CSV of path,label rows: data_root/{train,test}.csv (train|training, test|testing, "
                "val|valid|validation, any case), data_root/labels.csv or data_root=FILE.csv")
def load(cfg, root, seed) -> RawDataset:
    root = Path(root)
    found = split_files(root) if root.is_dir() else {}
    text, test_rows = None, None
    if found:
        train, test, text = choose_splits(found, root, "file")
        train_rows = read_rows(root / train)
        test_rows = read_rows(root / test) if test else None
    else:
        csv_path = root if root.suffix.lower() == ".csv" else root / "labels.csv"
        if root.is_dir() and not csv_path.is_file():
            csv_path = next((p for p in sorted(root.iterdir()) if p.name.lower() == "labels.csv"), csv_path)
        train_rows = read_rows(csv_path)
    names = sorted({r[1] for r in train_rows + (test_rows or [])}, key=sort_key)
    ids = {n: i for i, n in enumerate(names)}
    if test_rows is None:
        paths = [r[0] for r in train_rows]
        labels = np.asarray([ids[r[1]] for r in train_rows], dtype=np.int64)
        return split_sources("csv", names, paths, labels, cfg, seed, note=text or "")
    channels = guess_channels([r[0] for r in train_rows])
    mk = lambda rows: ImageSet(np.asarray([ids[r[1]] for r in rows]), sources=[r[0] for r in rows],
                               channels=channels, size=cfg.img_size)
    return RawDataset("csv", names, mk(train_rows), mk(test_rows), split=text)
