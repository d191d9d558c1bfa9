"""ImageNet-R, TinyImageNet and CUB-200-2011 (the natural datasets dynammo downloads and md5-checks) on
tiny generated files in each dataset's exact on-disk layout (lists, downloads, unsafe archives), and
the natural datasets' protocols. The documented class counts are monkeypatched down to the few
classes generated (few_classes, from tests/test_datasets_natural.py), except where a test checks that
the real count is enforced."""
from __future__ import annotations

import io
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

from dynammo.configure import build_config, load_config
from dynammo.data import load_data
from dynammo.data.datasets import cub200, imagenet_r, tinyimagenet
from dynammo.errors import UserError
from test_datasets_natural import (  # noqa: F401 (few_classes: a fixture)
    SORTED, WNIDS, few_classes, md5, no_network, raw_load, single_line, values, write)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- ImageNet-R


def make_imagenet_r(folder: Path, image_tools, per_class=5):
    """The official imagenet-r/<wnid>/<rendition>_<k>.jpg + README.txt."""
    renditions = ("art", "cartoon", "sketch", "misc", "toy")
    for wnid, v in WNIDS.items():
        for k in range(per_class):
            write(folder / wnid / f"{renditions[k % 5]}_{k}.jpg", v, image_tools)
    (folder / "README.txt").write_text("ImageNet-R: renditions of 200 ImageNet classes\n")
    return folder


def test_imagenet_r_official_folders_get_a_seeded_split(tmp_path, image_tools, few_classes, reversed_listing):
    make_imagenet_r(tmp_path / "imagenet-r", image_tools)
    raw = raw_load("imagenet-r", tmp_path, seed=1993)
    assert raw.class_names == SORTED
    assert torch.bincount(raw.train.labels).tolist() == [4, 4, 4] and torch.bincount(raw.test.labels).tolist() == [1, 1, 1]
    assert values(raw.train) == [WNIDS[SORTED[y]] for y in raw.train.labels.tolist()]
    assert raw.split == ("official imagenet-r/<wnid>/ folders, which have no official split: seeded stratified "
                         "split, test_fraction 0.2, seed 1993")
    assert raw_load("imagenetr", tmp_path, seed=1993).test.sources == raw.test.sources
    assert raw_load("imagenetr", tmp_path, seed=7, test_fraction=0.4).split.endswith("test_fraction 0.4, seed 7")


def test_imagenet_r_pre_split_folders_are_kept(tmp_path, image_tools, few_classes):
    top = tmp_path / "imagenet_r"
    make_imagenet_r(top / "train", image_tools, per_class=3)
    make_imagenet_r(top / "test", image_tools, per_class=1)
    (top / "train" / "README.txt").unlink()
    (top / "test" / "README.txt").unlink()
    raw = raw_load("imagenet_r", tmp_path)
    assert (len(raw.train), len(raw.test)) == (9, 3) and raw.test.labels.tolist() == [0, 1, 2]
    assert raw.split == f"pre-split folders train (train) and test (test) in {top}"


def write_coda_yaml(path: Path, rows):
    lines = ["data:"] + [f"- data/imagenet-r/{w}/{f}" for w, f, _ in rows] + ["targets:"] + [f"- {t}" for _, _, t in rows]
    path.write_text("\n".join(lines) + "\n")


def test_imagenet_r_coda_prompt_lists(tmp_path, image_tools, few_classes):
    top = make_imagenet_r(tmp_path / "imagenet-r", image_tools)
    target = {"n04552348": 0, "n02119789": 1, "n01440764": 2}  # CODA's own ids, not sorted order
    files = {w: sorted(p.name for p in (top / w).iterdir()) for w in WNIDS}
    train = [(w, f, target[w]) for w in WNIDS for f in files[w][:3]]
    test = [(w, f, target[w]) for w in WNIDS for f in files[w][3:4]]  # not every image is listed
    write_coda_yaml(top / "imagenet-r_train.yaml", train)
    write_coda_yaml(top / "imagenet-r_test.yaml", test)
    raw = raw_load("imagenet_r", tmp_path)
    assert raw.class_names == SORTED  # ids by sorted wnid, not CODA's targets
    assert raw.test.labels.tolist() == [SORTED.index(w) for w in WNIDS]
    assert (len(raw.train), len(raw.test)) == (9, 3)
    assert raw.test.sources[0] == str(top / "n04552348" / files["n04552348"][3])
    assert raw.split.startswith("CODA-Prompt lists imagenet-r_train.yaml/imagenet-r_test.yaml")
    write_coda_yaml(top / "imagenet-r_test.yaml", test + [("n01440764", "gone.jpg", 2)])
    with pytest.raises(UserError, match="imagenet-r_test.yaml lists 1 file\\(s\\) that do not exist.*n01440764/gone.jpg"):
        raw_load("imagenet_r", tmp_path)
    write_coda_yaml(top / "imagenet-r_test.yaml", [("n01440764", files["n01440764"][4], 0)])
    with pytest.raises(UserError, match="two meanings"):
        raw_load("imagenet_r", tmp_path)
    (top / "imagenet-r_test.yaml").unlink()
    with pytest.raises(UserError, match="imagenet-r_test.yaml does not exist"):
        raw_load("imagenet_r", tmp_path)


def imagenet_r_tar(tmp_path: Path, image_tools) -> Path:
    src = make_imagenet_r(tmp_path / "src" / "imagenet-r", image_tools, per_class=2)
    archive = tmp_path / "src" / "imagenet-r.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="imagenet-r")
    return archive


def test_imagenet_r_download_extract_and_md5(tmp_path, image_tools, few_classes, monkeypatch):
    archive = imagenet_r_tar(tmp_path, image_tools)
    calls = []

    def fake(url, filename, *a, **kw):
        calls.append(url)
        shutil.copyfile(archive, filename)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake)
    root = tmp_path / "root"
    with pytest.raises(UserError, match="wrong md5 \\(expected a61312130a589d0ca1a8fca1f2bd3337\\)"):
        raw_load("imagenet_r", root)
    assert calls == ["https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"] and list(root.iterdir()) == []
    monkeypatch.setattr(imagenet_r, "MD5", md5(archive))
    raw = raw_load("imagenet_r", root)
    assert raw.class_names == SORTED and len(raw.train) + len(raw.test) == 6
    assert (root / "imagenet-r.tar").is_file() and (root / "imagenet-r" / "README.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["imagenet-r", "imagenet-r.tar"]  # no temp folder left
    assert len(calls) == 2
    raw_load("imagenet_r", root)  # extracted now: neither downloaded nor extracted again
    assert len(calls) == 2


def test_imagenet_r_present_tar_md5_and_no_download(tmp_path, image_tools, few_classes, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError) as exc:
        raw_load("imagenet_r", tmp_path, download=False)
    msg = single_line(exc)
    assert "ImageNet-R not found" in msg and imagenet_r.URL in msg and "a61312130a589d0ca1a8fca1f2bd3337" in msg
    (tmp_path / "imagenet-r.tar").write_bytes(b"truncated")
    with pytest.raises(UserError, match=f"{tmp_path / 'imagenet-r.tar'} has md5 .*expected a61312130a589d0ca1a8fca1f2bd3337"):
        raw_load("imagenet_r", tmp_path, download=False)
    shutil.copyfile(imagenet_r_tar(tmp_path / "t", image_tools), tmp_path / "imagenet-r.tar")
    monkeypatch.setattr(imagenet_r, "MD5", md5(tmp_path / "imagenet-r.tar"))
    (tmp_path / "imagenet-r").mkdir()  # an interrupted hand extraction: nothing usable in it
    with pytest.raises(UserError, match="imagenet-r already exists but is not a complete ImageNet-R copy; delete it"):
        raw_load("imagenet_r", tmp_path, download=False)
    (tmp_path / "imagenet-r").rmdir()
    assert raw_load("imagenet_r", tmp_path, download=False).class_names == SORTED  # extracted, not downloaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet-r", "imagenet-r.tar", "t"]


def test_imagenet_r_unsafe_or_corrupt_tar_is_refused(tmp_path, monkeypatch):
    evil = tmp_path / "imagenet-r.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    monkeypatch.setattr(imagenet_r, "MD5", md5(evil))
    with pytest.raises(UserError, match="corrupt, truncated or unsafe"):
        raw_load("imagenet_r", tmp_path)
    assert not (tmp_path.parent / "escaped.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imagenet-r.tar"]


def test_imagenet_r_class_count(tmp_path, image_tools):
    make_imagenet_r(tmp_path / "imagenet-r", image_tools, per_class=1)
    with pytest.raises(UserError, match="has 3 classes, but ImageNet-R has 200"):
        raw_load("imagenet_r", tmp_path)


# ---------------------------------------------------------------- TinyImageNet


def make_tiny(root: Path, image_tools, wnids=tuple(WNIDS), per_class=2, val_per_class=1) -> Path:
    top = root / "tiny-imagenet-200"
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = {"n01440764": "tench, Tinca tinca", "n02119789": "kit fox, Vulpes macrotis",
             "n04552348": "warplane, military plane", "n00001740": "entity"}
    (top / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in words.items()))
    k = 0
    lines = []
    for wnid in wnids:
        v = WNIDS.get(wnid, 50)
        boxes = []
        for i in range(per_class):
            write(top / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", v, image_tools)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t7\t7")
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for _ in range(val_per_class):
            write(top / "val" / "images" / f"val_{k}.JPEG", v + 1, image_tools)
            lines.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t6\t7")
            k += 1
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write(top / "test" / "images" / "test_0.JPEG", 0, image_tools)
    return top


def test_tinyimagenet_official_layout(tmp_path, image_tools, few_classes, reversed_listing):
    make_tiny(tmp_path, image_tools)
    raw = raw_load("tiny-imagenet", tmp_path)
    assert raw.class_names == ["tench", "kit fox", "warplane"]  # sorted wnids, first words.txt name
    assert raw.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert raw.test.labels.tolist() == [2, 0, 1]  # val_annotations.txt order: wnids.txt order
    assert values(raw.train) == [10, 10, 20, 20, 30, 30] and values(raw.test) == [31, 11, 21]
    assert not any("/test/" in s for s in raw.train.sources + raw.test.sources)
    assert raw.split == "official train/ and val/ (val_annotations.txt) as the test split; test/ is unlabelled"
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):  # CRLF copies read the same
        path = tmp_path / "tiny-imagenet-200" / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    again = raw_load("tinyimagenet", tmp_path)
    assert again.class_names == raw.class_names and again.test.sources == raw.test.sources
    (tmp_path / "tiny-imagenet-200" / "words.txt").unlink()
    assert raw_load("tinyimagenet200", tmp_path / "tiny-imagenet-200").class_names == SORTED


def test_tinyimagenet_modified_copy_with_extra_wnids(tmp_path, image_tools, few_classes):
    """The public 202-wnid copy: two wnids appended to wnids.txt (no final newline), with folders and val lines."""
    top = make_tiny(tmp_path, image_tools, wnids=(*WNIDS, "n02480855", "n10148035"))
    (top / "wnids.txt").write_text("\n".join((*WNIDS, "n02480855", "n10148035")))
    with pytest.raises(UserError) as exc:
        raw_load("tinyimagenet", tmp_path)
    msg = single_line(exc)
    assert "lists 5 wnids, but TinyImageNet has 3" in msg and "n02480855, n10148035" in msg
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    with pytest.raises(UserError, match="folders that wnids.txt does not list \\(n02480855, n10148035\\)"):
        raw_load("tinyimagenet", tmp_path)


def test_tinyimagenet_list_errors(tmp_path, image_tools, few_classes, monkeypatch):
    top = make_tiny(tmp_path, image_tools)
    listing = top / "val" / "val_annotations.txt"
    listing.write_text(listing.read_text() + "val_77.JPEG\tn01440764\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="val_annotations.txt lists 1 file\\(s\\) that do not exist.*images/val_77.JPEG"):
        raw_load("tinyimagenet", tmp_path)
    listing.write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="labels val_0.JPEG with n09999999, which wnids.txt does not list"):
        raw_load("tinyimagenet", tmp_path)
    listing.unlink()
    with pytest.raises(UserError, match="val_annotations.txt does not exist"):
        raw_load("tinyimagenet", tmp_path)
    monkeypatch.setattr(tinyimagenet, "NUM_CLASSES", 200)
    with pytest.raises(UserError, match="has 3 classes, but TinyImageNet has 200"):
        raw_load("tinyimagenet", tmp_path)


def tiny_zip(tmp_path: Path, image_tools) -> Path:
    top = make_tiny(tmp_path / "zsrc", image_tools)
    archive = tmp_path / "zsrc" / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(top.rglob("*")):
            zf.write(p, p.relative_to(top.parent).as_posix())
    return archive


def test_tinyimagenet_download_and_safe_zip(tmp_path, image_tools, few_classes, monkeypatch):
    archive = tiny_zip(tmp_path, image_tools)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError) as exc:
        raw_load("tinyimagenet", tmp_path / "root", download=False)
    assert tinyimagenet.URL in single_line(exc) and "90528d7ca1a48142e341f4ef8d21d0de" in str(exc.value)
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, filename, *a, **kw: shutil.copyfile(archive, filename))
    with pytest.raises(UserError, match="wrong md5"):
        raw_load("tinyimagenet", tmp_path / "root")
    monkeypatch.setattr(tinyimagenet, "MD5", md5(archive))
    raw = raw_load("tinyimagenet", tmp_path / "root")
    assert raw.class_names == ["tench", "kit fox", "warplane"] and len(raw.test) == 3
    evil = tmp_path / "evil" / "tiny-imagenet-200.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    monkeypatch.setattr(tinyimagenet, "MD5", md5(evil))
    with pytest.raises(UserError, match="outside its folder"):
        raw_load("tinyimagenet", evil.parent)
    assert not (tmp_path / "outside.txt").exists()


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root: Path, image_tools, per_class=3, newline="\n") -> Path:
    """CUB_200_2011/ with its four lists (`<id> <value>`, LF) and images/<NNN.Name>/<Name>_<n>_<id>.jpg;
    images.txt lists the images by id, classes interleaved, and every third image is a test image."""
    top = root / "CUB_200_2011"
    top.mkdir(parents=True)
    images, labels, split = [], [], []
    image_id = 0
    for i in range(per_class):
        for c, name in enumerate(CUB_CLASSES, 1):
            image_id += 1
            rel = f"{name}/{name[4:]}_{image_id:04d}_{100 + image_id}.jpg"
            write(top / "images" / rel, 10 * c + (i == 2), image_tools)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {0 if i == 2 else 1}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("classes.txt", [f"{c} {n}" for c, n in enumerate(CUB_CLASSES, 1)])):
        (top / name).write_bytes((newline.join(lines) + newline).encode())
    (top / "bounding_boxes.txt").write_text("1 0.0 0.0 8.0 8.0\n")
    return top


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_cub200_official_layout(tmp_path, image_tools, few_classes, reversed_listing, newline):
    make_cub(tmp_path, image_tools, newline=newline)
    raw = raw_load("cub", tmp_path)
    assert raw.class_names == CUB_CLASSES
    assert raw.train.labels.tolist() == [0, 1, 2, 0, 1, 2] and raw.test.labels.tolist() == [0, 1, 2]
    assert values(raw.train) == [10, 20, 30, 10, 20, 30] and values(raw.test) == [11, 21, 31]
    assert raw.split == "official train_test_split.txt" and raw.flip and not raw.train.in_memory
    assert raw_load("cub_200_2011", tmp_path / "CUB_200_2011").class_names == CUB_CLASSES


def test_cub200_list_errors(tmp_path, image_tools, few_classes, monkeypatch):
    top = make_cub(tmp_path, image_tools)
    (top / "images" / CUB_CLASSES[1]).rename(top / "images" / "moved")
    with pytest.raises(UserError, match="images.txt lists 3 file\\(s\\) that do not exist.*002.Laysan_Albatross/"):
        raw_load("cub200", tmp_path)
    (top / "images" / "moved").rename(top / "images" / CUB_CLASSES[1])
    labels = (top / "image_class_labels.txt").read_text()
    (top / "image_class_labels.txt").write_text(labels.replace("1 1\n", "1 2\n", 1))
    with pytest.raises(UserError, match="image id 1 .* is not in the folder of its class 2"):
        raw_load("cub200", tmp_path)
    (top / "image_class_labels.txt").write_text(labels.replace("1 1\n", "", 1))
    with pytest.raises(UserError, match="disagree on image id 1"):
        raw_load("cub200", tmp_path)
    (top / "image_class_labels.txt").unlink()
    with pytest.raises(UserError, match="image_class_labels.txt does not exist"):
        raw_load("cub200", tmp_path)
    (top / "image_class_labels.txt").write_text(labels)
    monkeypatch.setattr(cub200, "NUM_CLASSES", 200)
    with pytest.raises(UserError, match="has 3 classes, but CUB-200-2011 has 200"):
        raw_load("cub200", tmp_path)


def test_cub200_tgz_download_and_md5(tmp_path, image_tools, few_classes, monkeypatch):
    top = make_cub(tmp_path / "src", image_tools, per_class=1)
    archive = tmp_path / "src" / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(top, arcname="CUB_200_2011")
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(UserError) as exc:
        raw_load("cub200", tmp_path / "root", download=False)
    assert cub200.URL in single_line(exc) and "97eceeb196236b17998738112f37df78" in str(exc.value)
    (tmp_path / "root").mkdir()
    shutil.copyfile(archive, tmp_path / "root" / "CUB_200_2011.tgz")
    with pytest.raises(UserError, match="expected 97eceeb196236b17998738112f37df78"):
        raw_load("cub200", tmp_path / "root", download=False)
    monkeypatch.setattr(cub200, "MD5", md5(archive))
    raw = raw_load("cub200", tmp_path / "root", download=False)
    assert len(raw.train) == 3 and len(raw.test) == 0
    (tmp_path / "root2").mkdir()
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, filename, *a, **kw: shutil.copyfile(archive, filename))
    assert raw_load("cub200", tmp_path / "root2").class_names == CUB_CLASSES


# ---------------------------------------------------------------- protocols

PROTOCOLS = {"imagenet100_b0": ("imagenet100", 10, 10, 2000, "ImageNet-100 not found"),
             "imagenet1000_bic": ("imagenet1000", 100, 100, 20000, "ImageNet-1K not found"),
             "imagenet_r_b0": ("imagenet_r", 20, 20, 2000, "ImageNet-R not found"),
             "cub200_icarl": ("cub200", 10, 10, 4000, "CUB-200-2011 not found")}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_natural_protocols_load_and_stop_on_missing_data(tmp_path, name, monkeypatch):
    dataset, init, inc, memory, missing = PROTOCOLS[name]
    cfg = load_config([name, "finetune"])
    assert (cfg.protocol, cfg.dataset, cfg.init_cls, cfg.increment, cfg.memory_size) == (name, dataset, init, inc, memory)
    assert cfg.seed == 1993 and cfg.shuffle and cfg.backbone == "resnet18" and cfg.img_size == 224
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    cfg = load_config([name, "finetune"], [f"data_root={tmp_path / 'nodata'}", "download=false"])
    with pytest.raises(UserError) as exc:
        load_data(cfg, seed=1993)
    assert missing in single_line(exc)


def test_natural_datasets_through_load_data(tmp_path, image_tools, few_classes):
    make_tiny(tmp_path / "t", image_tools)
    data = load_data(build_config({"dataset": "tinyimagenet", "data_root": str(tmp_path / "t")}), seed=1)
    assert data.train.in_memory and data.train.images.shape == (6, 3, 64, 64)  # the official 64 px
    assert data.split_text().startswith("official train/ and val/")
    make_imagenet_r(tmp_path / "r" / "imagenet-r", image_tools)
    data = load_data(build_config({"dataset": "imagenet_r", "data_root": str(tmp_path / "r"), "img_size": 8}), seed=1)
    assert data.class_names == SORTED and data.test.images.shape == (3, 3, 8, 8)
    assert data.split_text().endswith("seeded stratified split, test_fraction 0.2, seed 1")
