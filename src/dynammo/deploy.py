"""Using a trained model outside the framework: `dynammo export` writes one self-contained file
(a `torch.export` program: weights + the graph of the method's own decision rule, plus the class
names), and `dynammo predict` classifies image files with it.

The exported program takes uint8 images (B, C, H, W) at the run's input size and returns
(class id (B,), confidence (B,)). It applies the run's test view and normalisation inside, so callers
pass raw pixels: with `test_crop: center` the centre crop of evaluation (Resize(side*256/224) +
CenterCrop(side), data/transforms.center_view). A run with `keep_aspect` draws that crop on each
image's original geometry, so its program takes a second input, each image's original height / width
(B,) float32 (dynammo.json `inputs` names them; `dynammo predict` reads it from the file's header).
For DynaMMo this is the merged model: one forward pass whose feature every task head reads, then
min-others.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dynammo.data.imageset import source_aspect
from dynammo.data.transforms import center_view
from dynammo.errors import UserError
from dynammo.io import write_atomic
from dynammo.prediction import decision

META_FILE = "dynammo.json"
FORMAT = "dynammo-export-1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


class DeployedClassifier(nn.Module):
    """uint8 images (and, with keep_aspect, their original height / width) -> (class id, confidence),
    with the run's test view, normalisation and decision rule."""

    def __init__(self, method, mean: Sequence[float], std: Sequence[float], center_crop: bool = False):
        super().__init__()
        self.net = method.net  # registered, so its weights are part of the exported program
        self.predict_fn = method.predict
        self.center_crop = center_crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, aspect: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if self.center_crop:  # the run's test view, as evaluation's BatchTransform
            x = center_view(x, aspect)
        x = (x / 255.0 - self.mean) / self.std  # as data/transforms.BatchTransform
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return decision(self.predict_fn(x))


def export_run(run_dir, out, task=None, force: bool = False) -> dict:
    """Write the model of run_dir's checkpoint (the last, or after `task`) to `out`, atomically; an
    existing file is replaced only when it is an earlier export (or `force`). Returns the metadata."""
    from dynammo.run.restore import restore_method
    from dynammo.rundir import checkpoint_path, load_checkpoint, read_run_config

    check_export_target(Path(out), force)
    cfg = read_run_config(run_dir)
    path = checkpoint_path(run_dir, task)
    ckpt = load_checkpoint(path)
    method = restore_method(cfg, ckpt)
    record = ckpt["scenario"]
    test_crop, keep_aspect = cfg.get("test_crop", "none"), bool(cfg.get("keep_aspect", False))
    model = DeployedClassifier(method, record["mean"], record["std"], center_crop=test_crop == "center").eval()
    c, h, w = record["input_shape"]
    example = (torch.zeros((2, c, h, w), dtype=torch.uint8),)
    inputs = ["images"]
    if keep_aspect and test_crop == "center":  # the crop depends on each image's original geometry
        example, inputs = example + (torch.ones(2),), inputs + ["aspect"]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():  # two inputs of one batch: their equal size checked in the graph, not by guard code
        program = torch.export.export(model, example, dynamic_shapes=tuple({0: batch} for _ in example),
                                      prefer_deferred_runtime_asserts_over_guards=len(example) > 1)
    n_seen = sum(record["sizes"][: ckpt["task"] + 1])
    meta = {
        "format": FORMAT, "method": cfg.method, "dataset": ckpt["dataset"], "backbone": cfg.backbone,
        "task": ckpt["task"] + 1, "tasks": len(record["sizes"]),
        "class_names": [record["class_names"][c] for c in record["class_order"]][:n_seen],  # by class id
        "input_shape": [c, h, w], "mean": record["mean"], "std": record["std"], "source": str(Path(run_dir).resolve()),
        "test_crop": test_crop, "keep_aspect": keep_aspect, "inputs": inputs,
    }
    write_atomic(out, lambda fh: torch.export.save(program, fh, extra_files={META_FILE: json.dumps(meta)}))
    return meta


def is_earlier_export(path: Path) -> bool:
    """A file `dynammo export` wrote: a zip whose extra/dynammo.json names our format (read as text only)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            metas = [n for n in zf.namelist() if n.endswith(f"/extra/{META_FILE}") and n.count("/") == 2]
            if len(metas) != 1 or zf.getinfo(metas[0]).file_size > 1 << 24:
                return False
            return json.loads(zf.read(metas[0])).get("format") == FORMAT
    except (zipfile.BadZipFile, OSError, ValueError, AttributeError, RecursionError):
        return False


def check_export_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the path of the model file to write (e.g. {out / 'model.pt'})")
    if out.exists() and not force and not is_earlier_export(out):
        raise UserError(f"--out {out} exists and is not a model written by `dynammo export`; choose another --out, "
                        "or add --force to replace it")


def load_exported(path) -> Tuple[nn.Module, dict]:
    """(callable module, metadata) of a file written by `dynammo export`; needs only torch and dynammo.

    The safe way to load a model received from elsewhere: the archive is checked first
    (dynammo/export_archive.py) and refused, in one line naming the entry, when anything in it would
    be unpickled beyond plain tensors or executed; a bare `torch.export.load` would run such code."""
    from dynammo.export_archive import check_export_archive

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; write one with `dynammo export RUN_DIR --out {path}`")
    data = path.read_bytes()  # checked and loaded from the same bytes
    extra = check_export_archive(data, path)
    try:
        meta = json.loads(extra.get(META_FILE, ""))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{path} is not a model written by `dynammo export` (format {found!r})")
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # torch logs a traceback before raising on a damaged program
    try:
        program = torch.export.load(io.BytesIO(data))
        module = program.module()
    except Exception as exc:  # torch raises many types for a damaged program
        raise UserError(f"{path} is not a model written by `dynammo export` ({exc.__class__.__name__})") from exc
    finally:
        torch_log.setLevel(level)
    return module, meta


def model_inputs(meta: dict, images: torch.Tensor, files: Sequence[Path]) -> tuple:
    """What the exported program takes: the images, and each file's original height / width when the
    run kept aspect ratios (read from the header, as the run's data loading did)."""
    inputs = meta.get("inputs")  # absent from exports written before it: images only
    if not (isinstance(inputs, list) and "aspect" in inputs):
        return (images,)
    return images, torch.tensor([source_aspect(str(f)) for f in files], dtype=torch.float32)


def image_files(paths: Sequence[str]) -> List[Path]:
    """The given files, and the image files inside given folders (recursively, sorted)."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += inside
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"image {p} does not exist")
    return files


@torch.no_grad()
def predict_files(model_path, paths: Sequence[str], batch_size: int = 64, max_image_pixels: Optional[int] = None,
                  notes=None) -> List[dict]:
    """Rows (image, class, class id, confidence). One note line goes to `notes` (stderr) when images
    differ from what the model was trained on."""
    from dynammo.predict_images import PIXELS_FLAG, TrainingMismatch, default_max_pixels, pixel_limit, read_image

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise UserError(f"{PIXELS_FLAG} must be at least 1 (got {max_image_pixels})")
    max_pixels = max_image_pixels or default_max_pixels()
    model, meta = load_exported(model_path)
    files = image_files(paths)
    seen = TrainingMismatch(meta["input_shape"])
    rows = []
    with pixel_limit(max_pixels):
        for i in range(0, len(files), batch_size):
            chunk = files[i: i + batch_size]
            images = torch.cat([read_image(f, meta["input_shape"], max_pixels, seen) for f in chunk])
            pred, conf = model(*model_inputs(meta, images, chunk))
            for f, k, p in zip(chunk, pred.tolist(), conf.tolist()):
                rows.append({"image": str(f), "class": meta["class_names"][k], "class_id": k, "confidence": p})
    line = seen.line()
    if line:
        print(line, file=notes or sys.stderr)
    return rows


def print_predictions(rows: List[dict], as_csv: bool, stream=None) -> None:
    stream = stream or sys.stdout
    if as_csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["image", "class", "class_id", "confidence"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "confidence": f"{r['confidence']:.6f}"})
        stream.write(buf.getvalue())
        return
    width = max(len(r["image"]) for r in rows)
    for r in rows:
        stream.write(f"{r['image']:<{width}}  {r['class']}  {r['confidence']:.4f}\n")
