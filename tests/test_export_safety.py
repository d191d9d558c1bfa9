"""Files from elsewhere are data: hostile variants of a real `dynammo export` are refused by `dynammo
predict` before anything in them runs; `pretrained:` files and checkpoints with pickled code are
refused too; predict's bad inputs are one line; export does not overwrite what it did not write."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from method_helpers import DIGITS_8PX, QUIET, cli_args
from test_cli_e2e import assert_user_error

TINY = cli_args({"method": "replay"}, DIGITS_8PX, max_train_per_class=20, memory_size=20, epochs=1, init_cls=4,
                increment=3, **QUIET)


@pytest.fixture(scope="module")
def exported(cli, tmp_path_factory):
    """A real tiny run on digits and its export."""
    root = tmp_path_factory.mktemp("export_safety")
    run_dir, model = root / "run", root / "model.pt"
    proc = cli("run", "--out", str(run_dir), *TINY)
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", str(run_dir), "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    return run_dir, model


class Payload:
    """Unpickling it evaluates `code` (what a hostile pickle does)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def touch(marker) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def rewrite(src, dst, replace: dict) -> None:
    """Copy an export's zip, replacing (bytes), removing (None) or adding entries (relative to its root)."""
    replace = dict(replace)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1:]
            data = replace.pop(rel) if rel in replace else zin.read(info)
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in replace.items():
            zout.writestr(f"{root}/{rel}", data)


def entry(model, rel) -> bytes:
    with zipfile.ZipFile(model) as zf:
        return zf.read(f"{zf.namelist()[0].split('/')[0]}/{rel}")


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def hostile_sample_inputs(model, marker):
    """Still returns valid sample inputs, so a bare load succeeds silently."""
    code = f"{touch(marker)} or ((__import__('torch').zeros((2, 1, 8, 8), dtype=__import__('torch').uint8),), {{}})"
    return {"data/sample_inputs/model.pt": pickled(Payload(code))}, "data/sample_inputs/model.pt"


def hostile_pickled_weight(model, marker):
    config = json.loads(entry(model, "data/weights/model_weights_config.json"))
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    shape = [s["as_int"] for s in meta["tensor_meta"]["sizes"]]
    code = f"{touch(marker)} or __import__('torch').nn.Parameter(__import__('torch').zeros({shape}))"
    return ({"data/weights/model_weights_config.json": json.dumps(config).encode(),
             f"data/weights/{meta['path_name']}": pickled(Payload(code))}, "data/weights/model_weights_config.json")


def hostile_guards(model, marker):
    program = json.loads(entry(model, "models/model.json"))
    program["guards_code"] = [f"{touch(marker)} is None"]
    return {"models/model.json": json.dumps(program).encode()}, "models/model.json"


def hostile_expression(model, marker):
    text = entry(model, "models/model.json").decode()
    program = json.loads(text)
    sym = next(iter(program["range_constraints"]))
    old = f"Symbol('{sym}', positive=True, integer=True)"
    assert old in text
    text = text.replace(old, f"{old} + 0*len(str({touch(marker)}))", 1)
    return {"models/model.json": text.encode()}, "models/model.json"


def hostile_call(model, marker):
    program = json.loads(entry(model, "models/model.json"))
    program["graph_module"]["graph"]["nodes"].insert(0, {
        "target": "torch.os.system", "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "evil"})
    return {"models/model.json": json.dumps(program).encode()}, "models/model.json"


def hostile_opaque_constant(model, marker):
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}}}
    import pickle

    return ({"data/constants/model_constants_config.json": json.dumps(config).encode(),
             "data/constants/opaque_obj_0": pickle.dumps(Payload(touch(marker)))}, "data/constants/opaque_obj_0")


def hostile_legacy_weights(model, marker):
    return {"data/weights/model.pt": pickled(Payload(touch(marker)))}, "data/weights/model.pt"


def hostile_compiled_library(model, marker):
    return {"data/aotinductor/model/model.so": b"\x7fELF not really"}, "data/aotinductor/model/model.so"


VARIANTS = [hostile_sample_inputs, hostile_pickled_weight, hostile_guards, hostile_expression, hostile_call,
            hostile_opaque_constant, hostile_legacy_weights, hostile_compiled_library]


def write_png(path, side=8, colour=False):
    rng = np.random.default_rng(0)
    shape = (side, side, 3) if colour else (side, side)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda f: f.__name__)
def test_hostile_export_is_refused_before_anything_runs(cli, exported, tmp_path, variant):
    _, model = exported
    marker = tmp_path / "marker"
    replace, named = variant(model, marker)
    bad = tmp_path / "received.pt"
    rewrite(model, bad, replace)
    image = write_png(tmp_path / "x.png")
    assert_user_error(cli("predict", str(bad), str(image)), str(bad), f"entry {named}", "refusing")
    assert not marker.exists()
    from dynammo.deploy import load_exported
    from dynammo.errors import UserError

    with pytest.raises(UserError, match=named):  # the documented Python API refuses it too
        load_exported(bad)
    assert not marker.exists()


@pytest.mark.parametrize("variant", [hostile_sample_inputs, hostile_pickled_weight, hostile_guards,
                                     hostile_expression], ids=lambda f: f.__name__)
def test_a_bare_torch_export_load_would_run_the_payload(cli, exported, tmp_path, variant):
    """Why load_exported exists: torch's own loader runs these files' code (the README says so)."""
    _, model = exported
    marker = tmp_path / "marker"
    replace, _ = variant(model, marker)
    bad = tmp_path / "received.pt"
    rewrite(model, bad, replace)
    code = ("import io, torch\ntry:\n    m = torch.export.load(io.BytesIO(open(%r, 'rb').read())).module()\n"
            "    m(torch.zeros((2, 1, 8, 8), dtype=torch.uint8))\nexcept Exception:\n    pass\n" % str(bad))
    cli.python("-c", code, timeout=300)
    assert marker.exists()


def test_genuine_export_still_predicts_and_an_unchanged_copy_too(cli, exported, tmp_path):
    _, model = exported
    copy = tmp_path / "copy.pt"
    rewrite(model, copy, {})  # re-zipped by Python's zipfile: same entries
    image = write_png(tmp_path / "x.png")
    for m in (model, copy):
        proc = cli("predict", str(m), str(image), "--csv")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == ""  # an 8x8 grayscale image is what the model was trained on
        assert proc.stdout.splitlines()[1].startswith(f"{image},")


def test_predict_says_once_when_images_differ_from_the_training_images(cli, exported, tmp_path):
    _, model = exported
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"scan{i}.png", side=64, colour=True)
    write_png(folder / "same.png")
    proc = cli("predict", str(model), str(folder))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 4  # still predicted
    notes = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: "), proc.stderr
    assert "3 far from the model's 8x8 input size" in notes[0] and "scan0.png is 64x64" in notes[0]
    assert "3 in colour, the model was trained on grayscale" in notes[0]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_predict_batch_size_must_be_positive(cli, exported, tmp_path, value):
    _, model = exported
    image = write_png(tmp_path / "x.png")
    assert_user_error(cli("predict", str(model), str(image), "--batch-size", value), "--batch-size", value)


def png_header_only(path, width, height):
    """A PNG whose header declares width x height pixels (its data is cut short): a decompression bomb's
    first bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    return path


def test_image_over_the_pixel_limit_is_one_line_naming_the_limit_and_the_flag(cli, exported, tmp_path):
    _, model = exported
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert_user_error(cli("predict", str(model), str(bomb)), "bomb.png", "100000x100000", "89,478,485",
                      "--max-image-pixels")
    small = write_png(tmp_path / "x.png")
    assert_user_error(cli("predict", str(model), str(small), "--max-image-pixels", "10"), "x.png", "limit of 10",
                      "--max-image-pixels")
    assert_user_error(cli("predict", str(model), str(small), "--max-image-pixels", "0"), "--max-image-pixels")


def test_a_large_legitimate_image_is_predicted(cli, exported, tmp_path):
    _, model = exported
    big = tmp_path / "scan.png"
    Image.new("L", (10_000, 6_000), 40).save(big)  # 60 M pixels: under PIL's limit
    proc = cli("predict", str(model), str(big))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(big))
    assert "far from the model's 8x8 input size" in proc.stderr  # the one note, not an error


def test_export_does_not_overwrite_what_it_did_not_write(cli, exported, tmp_path):
    run_dir, model = exported
    results = run_dir / "results.json"
    before = results.read_bytes()
    assert_user_error(cli("export", str(run_dir), "--out", str(results)), "results.json", "--force")
    assert results.read_bytes() == before
    assert_user_error(cli("export", str(run_dir), "--out", str(tmp_path)), "is a directory")
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes\n")
    assert_user_error(cli("export", str(run_dir), "--out", str(notes)), "notes.pt", "--force")
    assert notes.read_text() == "my notes\n"
    proc = cli("export", str(run_dir), "--out", str(notes), "--force")
    assert proc.returncode == 0, proc.stderr
    earlier = tmp_path / "earlier.pt"
    shutil.copy(model, earlier)
    proc = cli("export", str(run_dir), "--out", str(earlier), "--task", "1")  # an earlier export: replaced
    assert proc.returncode == 0, proc.stderr
    from dynammo.deploy import load_exported

    assert load_exported(earlier)[1]["task"] == 1 and load_exported(notes)[1]["task"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written atomically, nothing left


def test_pretrained_file_with_pickled_code_is_refused(cli, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "weights.pt"
    torch.save({"conv1.weight": Payload(touch(marker))}, evil)
    assert_user_error(cli("run", "--out", str(tmp_path / "run"), *TINY, f"pretrained={evil}"), "weights.pt",
                      "cannot be loaded")
    assert not marker.exists() and not (tmp_path / "run").exists()
    from dynammo.errors import UserError
    from dynammo.models.backbones.vit import read_vit_state_dict

    with pytest.raises(UserError, match="cannot be loaded"):  # a ViT's .pth goes through the same reader
        read_vit_state_dict(evil)
    assert not marker.exists()


def test_export_of_a_checkpoint_with_pickled_code_is_refused(cli, exported, tmp_path):
    run_dir, _ = exported
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "status": "running"}))  # so resume reads it
    marker = tmp_path / "marker"
    path = run / "checkpoints" / "task_2.pt"
    state = torch.load(path, weights_only=True)
    state["payload"] = Payload(touch(marker))
    torch.save(state, path)
    for args in (("export", str(run), "--out", str(tmp_path / "m.pt")), ("eval", str(run)), ("resume", str(run))):
        assert_user_error(cli(*args), "task_2.pt")
    assert not marker.exists() and not (tmp_path / "m.pt").exists()
