"""Hostile files are one line and exit status 2, never a traceback, a stuck run or a half-written file
(issue 21, part 3): any bytes as an image, any tree of class folders, any archive member name (each
class of input with a property), pixel limits, symlink loops, non-UTF-8 CSVs; and `dynammo cost`
without data. YAML documents and results.json fields: tests/test_hostile_inputs.py."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dynammo.configure import build_config, load_config
from dynammo.data import load_data
from dynammo.errors import UserError
from test_cli_e2e import assert_user_error
from test_hostile_inputs import BOUNDED, TINY, folder_cfg, png

pytestmark = pytest.mark.usefixtures("single_thread_module")


# ---------------------------------------------------------------- images, folders, archives


def huge_png_header(png_bytes: bytes, side: int) -> bytes:
    """The PNG with its IHDR chunk (bytes 16-29, CRC 29-33) claiming side x side pixels."""
    import zlib

    ihdr = side.to_bytes(4, "big") * 2 + png_bytes[24:29]
    return png_bytes[:16] + ihdr + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big") + png_bytes[33:]


@settings(**BOUNDED, max_examples=25)
@given(kind=st.sampled_from(["random", "truncated", "empty", "header-only", "huge-header", "text"]),
       seed=st.integers(0, 1000))
def test_any_bytes_as_an_image_decode_or_are_one_line(tmp_path_factory, kind, seed):
    from dynammo.data.imageset import decode_image, set_max_image_pixels

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(buf, "PNG")
    good = buf.getvalue()
    data = {"random": rng.bytes(int(rng.integers(1, 200))), "truncated": good[: len(good) // 2], "empty": b"",
            "header-only": good[:33], "text": b"path,label\n",
            # a valid PNG header (its CRC recomputed) claiming 60000 x 60000 pixels: a decompression bomb
            "huge-header": huge_png_header(good, 60000)}[kind]
    set_max_image_pixels(None)
    try:
        img = decode_image(("x.png", data), 3, 8)
    except UserError as exc:
        assert str(exc).startswith("image x.png ") and "\n" not in str(exc)
        if kind == "huge-header":
            assert "max_image_pixels" in str(exc)
    else:
        assert img.shape == (3, 8, 8) and kind in ("random", "truncated")


def test_an_image_past_the_pixel_limit_names_the_key_and_the_key_lets_it_through(cli, tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            png(tmp_path / c / f"{i}.png", seed=i)
    png(tmp_path / "a" / "scan.png", size=(60, 50))
    proc = cli("run", "--out", str(tmp_path / "never"), *TINY[1:], "dataset=folder", f"data_root={tmp_path}",
               "init_cls=1", "increment=1", "max_image_pixels=2000")
    assert_user_error(proc, "scan.png has 3000 pixels", "max_image_pixels=2000", "max_image_pixels=3000")
    assert not (tmp_path / "never").exists()
    data = load_data(folder_cfg(tmp_path, max_image_pixels=3000), 1)
    assert data.num_classes == 2


def test_a_legitimate_10000_px_scan_works_at_the_default_limit(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            png(tmp_path / c / f"{i}.png", seed=i)
    Image.new("L", (10_000, 10_000), 128).save(tmp_path / "a" / "slide.png")  # 1e8 pixels: past Pillow's warning
    data = load_data(folder_cfg(tmp_path), 1)
    assert data.num_classes == 2 and tuple(data.train.images.shape[1:]) == (3, 8, 8)


ENTRY = st.sampled_from(["image", "image", "image", "empty-file", "garbage", "self-loop", "dir-loop", "dangling",
                         "subdir-with-image", "not-an-image"])


@settings(**BOUNDED, max_examples=30)
@given(classes=st.lists(st.lists(ENTRY, min_size=0, max_size=4), min_size=1, max_size=4))
def test_any_tree_of_class_folders_loads_or_is_one_line(tmp_path_factory, classes):
    """Every class of a loaded dataset has training and test images; anything else is one UserError."""
    root = tmp_path_factory.mktemp("tree")
    for c, entries in enumerate(classes):
        folder = root / f"class{c}"
        folder.mkdir()
        for i, kind in enumerate(entries):
            target = folder / f"{i}.png"
            if kind == "image":
                png(target, seed=c * 10 + i)
            elif kind == "empty-file":
                target.write_bytes(b"")
            elif kind == "garbage":
                target.write_bytes(os.urandom(64))
            elif kind == "self-loop":
                os.symlink(target.name, target)
            elif kind == "dir-loop":
                os.symlink("..", folder / f"up{i}")
            elif kind == "dangling":
                os.symlink("nowhere.png", target)
            elif kind == "subdir-with-image":
                (folder / f"sub{i}").mkdir()
                png(folder / f"sub{i}" / "x.png")
            else:
                (folder / f"{i}.txt").write_text("x")
    try:
        data = load_data(folder_cfg(root), 1)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    counts = data.class_counts()
    assert all(train > 0 and test > 0 for _, train, test in counts), counts


def test_a_class_of_one_image_is_refused_before_training_naming_it(cli, tmp_path):
    for c, n in (("a", 3), ("b", 3), ("lonely", 1)):
        (tmp_path / c).mkdir()
        for i in range(n):
            png(tmp_path / c / f"{i}.png", seed=i)
    proc = cli("run", "--out", str(tmp_path / "never"), *TINY[1:], "dataset=folder", f"data_root={tmp_path}",
               "init_cls=1", "increment=1")
    assert_user_error(proc, "class 'lonely'", "no test image", "add images to it")
    assert not (tmp_path / "never").exists()


def test_a_symlink_loop_and_a_non_utf8_csv_are_one_line(cli, tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            png(tmp_path / c / f"{i}.png", seed=i)
    os.symlink("loop.png", tmp_path / "b" / "loop.png")
    proc = cli("run", "--out", str(tmp_path / "never"), *TINY[1:], "dataset=folder", f"data_root={tmp_path}",
               "init_cls=1", "increment=1")
    assert_user_error(proc, "loop.png cannot be read", "symbolic link loop")
    (tmp_path / "b" / "loop.png").unlink()
    rows = "path,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in "ab" for i in range(3)) + "a/0.png,caf\xe9\n"
    (tmp_path / "labels.csv").write_bytes(rows.encode("latin-1"))
    proc = cli("run", "--out", str(tmp_path / "never"), *TINY[1:], "dataset=csv", f"data_root={tmp_path}",
               "init_cls=1", "increment=1")
    assert_user_error(proc, "labels.csv is not UTF-8 text (line 8", "save it as UTF-8")
    assert not (tmp_path / "never").exists()


MEMBER = st.one_of(
    st.sampled_from(["MedNIST/Hand/{i}.jpeg", "MedNIST/CT/{i}.jpeg", "MedNIST/../{i}.jpeg", "../../{i}.jpeg",
                     "/abs/Hand/{i}.jpeg", "MedNIST/Hand/../../{i}.jpeg", "C:/MedNIST/Hand/{i}.jpeg",
                     "MedNIST\\..\\Hand\\{i}.jpeg", "{i}.jpeg", "MedNIST/Hand/./{i}.jpeg"]),
    st.text(alphabet="./\\abHC", min_size=1, max_size=12).map(lambda t: t + "/{i}.jpeg"))


@settings(**BOUNDED, max_examples=30)
@given(names=st.lists(MEMBER, min_size=1, max_size=8))
def test_any_mednist_archive_loads_or_is_one_line(tmp_path_factory, names):
    """Members climbing out of the archive are refused; a loaded archive never has a class named '..',
    '.' or ''."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, "JPEG")
    root = tmp_path_factory.mktemp("mednist")
    with tarfile.open(root / "mednist.tar.gz", "w:gz") as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name.format(i=i))
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    cfg = build_config({"dataset": "mednist", "data_root": str(root), "test_fraction": 0.5, "device": "cpu"})
    try:
        data = load_data(cfg, 1)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        if any(".." in n.replace("\\", "/").split("/") for n in names):
            assert "outside its folder" in str(exc) or "no test image" in str(exc) or "no images" in str(exc)
        return
    assert not {"..", ".", ""} & set(data.class_names)
    assert not any(".." in n.replace("\\", "/").split("/") for n in names)


# ---------------------------------------------------------------- dynammo cost


@pytest.mark.parametrize("sources", [["mednist_cpu", "dynammo"], ["cifar100_acl", "dynammo"]])
def test_cost_of_a_shipped_protocol_needs_no_data_and_takes_a_seed_list(cli, tmp_path, sources):
    """mednist_cpu lists three seeds (a TypeError before); cifar100_acl's data and weights are not here."""
    proc = cli("cost", *[a for s in sources for a in ("-c", s)], "--json", "data_root=" + str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["classes"] for r in rows] == {"mednist_cpu": [2, 4, 6], "cifar100_acl": list(range(10, 101, 10))}[sources[0]]
    assert all(r["inference_gflops"] > 0 and r["params_total"] > 0 for r in rows)


def test_cost_from_the_registered_shape_equals_cost_from_the_data():
    from dynammo.console import Console
    from dynammo.cost import structure_costs
    from dynammo.cost_parts import cost_parts, shape_only_parts
    from dynammo.data.datasets import SHAPES
    from dynammo.run.build import prepare

    cfg = load_config(None, ["method=replay", "backbone=resnet20", "memory_size=20", "device=cpu",
                             "max_train_per_class=1", "max_test_per_class=1", "progress=false"])
    console = Console(progress="false", quiet=True)

    def rows(parts):
        _, scenario, engine, method = parts
        return structure_costs(method, scenario, engine.test_tf(scenario.test.get(torch.tensor([0]))))

    assert rows(shape_only_parts(cfg, [SHAPES["digits"]], console)) == rows(prepare(cfg, console))
    assert rows(cost_parts(cfg, console)) == rows(prepare(cfg, console))


def test_cost_of_an_unknown_shape_says_what_it_needs(cli, tmp_path):
    proc = cli("cost", "dataset=folder", f"data_root={tmp_path / 'nothing'}", "method=replay", "img_size=8")
    assert_user_error(proc, "dynammo cost needs the images of dataset folder", "does not exist")
