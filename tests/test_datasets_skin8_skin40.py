"""SKIN8 (ISIC 2019) and SKIN40 (SD-198) on tiny generated files in each source's exact on-disk layout:
class ids and names, the reference lists and task pairs, the seeded fallbacks and every one-line
error (PATH16 and SKIN7: tests/test_datasets_medical.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dynammo.data.datasets import skin8, skin40
from dynammo.data.datasets.files import md5sum
from dynammo.errors import UserError
from test_datasets_medical import (assert_pixels_match_labels, crlf, raw_load, scenario, task_names, value_of,
                                  write_gt_csv, write_jpg)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- SKIN8 (ISIC 2019)

SKIN8 = skin8.CLASS_NAMES  # BKL, MEL, DF, NV, SCC, BCC, AK, VASC


def skin8_files(per_class):
    """{class: [file names]}: ISIC ids, one official `_downsampled` name in MEL."""
    out, k = {}, 0
    for label, cls in enumerate(SKIN8):
        names = []
        for _ in range(per_class[cls] if isinstance(per_class, dict) else per_class):
            names.append(f"ISIC_{k:07d}{'_downsampled' if cls == 'MEL' and not names else ''}.jpg")
            k += 1
        out[cls] = names
    return out


def make_skin8(root: Path, image_tools, per_class=3, lists=True, list_dir=None, flat=False):
    """ISIC2019/Data/<CLASS>/ (or the flat official folder + GT CSV) with CRLF lists: the first file
    of each class in the test list, the rest in the train list."""
    files = skin8_files(per_class)
    top = root / "ISIC2019"
    for label, cls in enumerate(SKIN8):
        for name in files[cls]:
            path = (root / skin8.FLAT / name) if flat else (top / "Data" / cls / name)
            write_jpg(image_tools, path, value_of(label))
    if flat:
        write_gt_csv(root / skin8.GT_CSV, [(Path(n).stem, SKIN8.index(c)) for c in SKIN8 for n in files[c]],
                     skin8.GT_COLUMNS, SKIN8)
    if lists:
        where = list_dir or (root if flat else top)
        where.mkdir(parents=True, exist_ok=True)
        train = [f"Data/{c}/{n} {label}" for label, c in enumerate(SKIN8) for n in files[c][1:]]
        test = [f"Data/{c}/{files[c][0]} {label}" for label, c in enumerate(SKIN8)]
        (where / "skin8_train_500.txt").write_bytes(crlf(train))
        (where / "skin8_test_500.txt").write_bytes(crlf(test))
    return top


def test_skin8_lists_layout_label_order_and_other_lists(tmp_path, image_tools, reversed_listing):
    top = make_skin8(tmp_path, image_tools)
    raw = raw_load("skin8", tmp_path)
    assert raw.class_names == ["BKL", "MEL", "DF", "NV", "SCC", "BCC", "AK", "VASC"]
    assert torch.bincount(raw.train.labels).tolist() == [2] * 8
    assert torch.bincount(raw.test.labels).tolist() == [1] * 8
    assert_pixels_match_labels(raw.train)
    assert_pixels_match_labels(raw.test)
    assert any(p.endswith("_downsampled.jpg") for p in raw.test.sources)
    assert raw.split.startswith("OTHER lists skin8_train_500.txt/skin8_test_500.txt")
    assert raw_load("isic2019", top).class_names == raw.class_names  # data_root = ISIC2019/ itself


def test_skin8_lists_are_also_found_in_data_root(tmp_path, image_tools):
    make_skin8(tmp_path, image_tools, list_dir=tmp_path)
    assert torch.bincount(raw_load("skin8", tmp_path).train.labels).tolist() == [2] * 8


def test_skin8_reference_lists_are_recognised_by_md5(tmp_path, image_tools, monkeypatch):
    top = make_skin8(tmp_path, image_tools)
    sums = {}
    for name in skin8.LISTS:
        data = (top / name).read_bytes()
        (tmp_path / "lf").mkdir(exist_ok=True)
        (tmp_path / "lf" / name).write_bytes(data.replace(b"\r", b""))
        sums[name] = (md5sum(top / name), md5sum(tmp_path / "lf" / name))
    monkeypatch.setattr(skin8, "REFERENCE_MD5", sums)
    assert raw_load("skin8", tmp_path).split == "reference lists skin8_train_500.txt/skin8_test_500.txt (md5 match)"
    for name in skin8.LISTS:  # the same lists with the carriage returns stripped
        (top / name).write_bytes((tmp_path / "lf" / name).read_bytes())
    assert "md5 match, CR-stripped" in raw_load("skin8", tmp_path).split
    (top / "skin8_test_500.txt").write_bytes((top / "skin8_test_500.txt").read_bytes() + b"\n")
    assert "(the md5 of skin8_test_500.txt is not the reference lists')" in raw_load("skin8", tmp_path).split


def test_skin8_reference_md5_sums_are_the_documented_ones():
    assert skin8.REFERENCE_MD5["skin8_train_500.txt"][0] == "4e4b17d3c45834486ccf6da471937e41"
    assert skin8.REFERENCE_MD5["skin8_test_500.txt"][0] == "b40f44a2e91130d3b56ce35851be1cba"
    train_lf, test_lf = skin8.REFERENCE_MD5["skin8_train_500.txt"][1], skin8.REFERENCE_MD5["skin8_test_500.txt"][1]
    assert train_lf.startswith("f4003a32") and train_lf.endswith("1716")
    assert test_lf.startswith("3ab175df") and test_lf.endswith("336f")


def test_skin8_shuffle_false_gives_the_reference_task_pairs(tmp_path, image_tools):
    make_skin8(tmp_path, image_tools, per_class=2)
    data, sc = scenario("skin8_acl", tmp_path, 1)
    assert task_names(data, sc) == [{"BKL", "MEL"}, {"DF", "NV"}, {"SCC", "BCC"}, {"AK", "VASC"}]
    data, sc = scenario("skin8_scratch", tmp_path, 1993)  # the reference's shuffled from-scratch setting
    assert task_names(data, sc) == [{"DF", "NV"}, {"BKL", "SCC"}, {"BCC", "AK"}, {"VASC", "MEL"}]
    data, sc = scenario("skin8_scratch", tmp_path, 42)
    assert task_names(data, sc) == [{"MEL", "BCC"}, {"BKL", "VASC"}, {"DF", "SCC"}, {"NV", "AK"}]


def test_skin8_official_flat_folder_with_the_lists(tmp_path, image_tools):
    make_skin8(tmp_path, image_tools, flat=True)
    raw = raw_load("skin8", tmp_path)
    assert raw.class_names == SKIN8 and torch.bincount(raw.train.labels).tolist() == [2] * 8
    assert all(Path(p).parent.name == skin8.FLAT for p in raw.train.sources)
    assert_pixels_match_labels(raw.train)


PER_CLASS = {"BKL": 14, "MEL": 13, "DF": 6, "NV": 20, "SCC": 12, "BCC": 7, "AK": 9, "VASC": 6}


@pytest.mark.parametrize("flat", [False, True])
def test_skin8_fallback_reproduces_the_counts_rule(tmp_path, image_tools, monkeypatch, flat):
    monkeypatch.setattr(skin8, "CAP", 12)
    make_skin8(tmp_path, image_tools, per_class=PER_CLASS, lists=False, flat=flat)
    raw = raw_load("skin8", tmp_path)
    want = [skin8.fallback_counts(PER_CLASS[c], 12) for c in SKIN8]
    assert torch.bincount(raw.train.labels).tolist() == [tr for tr, _ in want]
    assert torch.bincount(raw.test.labels).tolist() == [te for _, te in want]
    assert raw.split.startswith("FALLBACK (lists skin8_train_500.txt/skin8_test_500.txt absent)")
    assert "k=min(n,12), test=floor(k/6), seed 1993" in raw.split
    assert not set(raw.train.sources) & set(raw.test.sources)
    assert_pixels_match_labels(raw.test)
    # a class of at most CAP images is used whole (SCC, DF, VASC in the real data)
    scc = SKIN8.index("SCC")
    assert (raw.train.labels == scc).sum() + (raw.test.labels == scc).sum() == 12
    again = raw_load("skin8", tmp_path, seed=42)  # the split does not depend on the run seed
    assert again.train.sources == raw.train.sources and again.test.sources == raw.test.sources


def test_skin8_fallback_rule_gives_the_reference_lists_counts():
    totals = {"MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628}
    reference_train = [524, 524, 200, 524, 524, 524, 524, 211]  # BKL MEL DF NV SCC BCC AK VASC
    reference_test = [104, 104, 39, 104, 104, 104, 104, 42]
    counts = [skin8.fallback_counts(totals[c]) for c in SKIN8]
    assert [tr for tr, _ in counts] == reference_train and [te for _, te in counts] == reference_test
    assert sum(reference_train) == 3555 and sum(reference_test) == 705


def test_skin8_errors(tmp_path, image_tools):
    with pytest.raises(UserError, match=r"SKIN8 \(ISIC 2019\) not found .*challenge.isic-archive.com"):
        raw_load("skin8", tmp_path)
    top = make_skin8(tmp_path, image_tools)
    train = top / "skin8_train_500.txt"
    text = train.read_bytes()
    train.unlink()
    with pytest.raises(UserError, match="found .*skin8_test_500.txt but not .*skin8_train_500.txt"):
        raw_load("skin8", tmp_path)
    train.write_bytes(text + b"Data/NV/ISIC_9999999.jpg 3\r\n")
    with pytest.raises(UserError, match="lists 1 file.* that do not exist .*Data/NV/ISIC_9999999.jpg"):
        raw_load("skin8", tmp_path)
    train.write_bytes(text.replace(b"Data/NV/ISIC_0000010.jpg 3", b"Data/NV/ISIC_0000010.jpg 1"))
    with pytest.raises(UserError, match="labels NV/ISIC_0000010.jpg 1 .*MEL.* but it is in folder NV"):
        raw_load("skin8", tmp_path)
    seven = b"".join(line + b"\r\n" for line in text.split(b"\r\n") if line and not line.endswith(b" 7"))
    train.write_bytes(seven)
    with pytest.raises(UserError, match="has 7 classes, but SKIN8 has 8"):
        raw_load("skin8", tmp_path)
    for name in skin8.LISTS:
        (top / name).unlink()
    shutil.rmtree(top / "Data" / "VASC")
    with pytest.raises(UserError, match=r"lacks the class folder\(s\) VASC"):
        raw_load("skin8", tmp_path)
    (top / "Data" / "VASC").mkdir()
    (top / "Data" / "UNK").mkdir()
    with pytest.raises(UserError, match="holds no images|not SKIN8 classes"):
        raw_load("skin8", tmp_path)


def test_skin8_flat_errors_and_corrupt_image(tmp_path, image_tools):
    make_skin8(tmp_path, image_tools, lists=False, flat=True)
    gt = tmp_path / skin8.GT_CSV
    good = gt.read_text()
    gt.write_text(good.replace("image,MEL,NV", "image,NV,MEL"))
    with pytest.raises(UserError, match="expected 'image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK'"):
        raw_load("skin8", tmp_path)
    gt.unlink()
    with pytest.raises(UserError, match="neither the skin8 lists .* nor ISIC_2019_Training_GroundTruth.csv"):
        raw_load("skin8", tmp_path)
    gt.write_text(good)
    bad = sorted((tmp_path / skin8.FLAT).iterdir())[0]
    bad.write_bytes(b"\xff\xd8 truncated")
    raw = raw_load("skin8", tmp_path)
    part = raw.train if str(bad) in raw.train.sources else raw.test
    with pytest.raises(UserError, match=f"image {bad} cannot be read"):
        part.materialize()


# ---------------------------------------------------------------- SKIN40 (SD-198)

SKIN40 = skin40.CLASS_NAMES


def make_sd198(root: Path, image_tools, per_class=3, lists=True, classes=None):
    top = root / "SD-198"
    files = {}
    for label, cls in enumerate(SKIN40):
        if classes is not None and cls not in classes:
            continue
        names = [f"{label:03d}{i:03d}HB.jpg" for i in range(per_class)]
        if label == 3:
            names[-1] = "Inverse-Palm[1].Ps.jpg"  # real SD-198 names hold brackets
        files[cls] = names
        for name in names:
            write_jpg(image_tools, top / "images" / cls / name, value_of(label % 20))
    # 2 of SD-198's other 158 classes, which SKIN40 does not use
    for other in ("Lichen_Planus", "Scabies"):
        write_jpg(image_tools, top / "images" / other / "000001HB.jpg", 250)
    if lists:
        split = top / "main_classes_split"
        split.mkdir(parents=True)
        train = [f"{c}/{n} {SKIN40.index(c)}" for c in files for n in files[c][1:]]
        test = [f"{c}/{files[c][0]} {SKIN40.index(c)}" for c in files]
        (split / "train_1.txt").write_bytes(crlf(train))
        (split / "val_1.txt").write_bytes(crlf(test))
    return top


def assert_skin40_pixels(part):
    mem = part.materialize()
    got = mem.images[:, 0, 0, 0].to(torch.int64)
    want = torch.tensor([value_of(int(y) % 20) for y in mem.labels])
    assert (got - want).abs().max() <= 3


def test_skin40_lists_layout(tmp_path, image_tools, reversed_listing):
    top = make_sd198(tmp_path, image_tools)
    raw = raw_load("skin40", tmp_path)
    assert raw.class_names == SKIN40 and len(SKIN40) == 40
    assert raw.class_names[1] == "Actinic_solar_Damage(Solar_Elastosis)" and raw.class_names[39] == "Dermatofibroma"
    assert torch.bincount(raw.train.labels).tolist() == [2] * 40
    assert torch.bincount(raw.test.labels).tolist() == [1] * 40
    assert any(p.endswith("Inverse-Palm[1].Ps.jpg") for p in raw.train.sources)
    assert_skin40_pixels(raw.train)
    assert raw.split.startswith("OTHER lists train_1.txt/val_1.txt")
    assert raw_load("sd-198", top).class_names == SKIN40  # data_root = SD-198/ itself


def test_skin40_reference_md5_and_protocol_order(tmp_path, image_tools, monkeypatch):
    top = make_sd198(tmp_path, image_tools, per_class=2)
    split = top / "main_classes_split"
    monkeypatch.setattr(skin40, "REFERENCE_MD5", ((md5sum(split / "train_1.txt"), "-"),
                                                  (md5sum(split / "val_1.txt"), "-")))
    assert raw_load("skin40", tmp_path).split.startswith("reference lists train_1.txt/val_1.txt (md5 =")
    data, sc = scenario("skin40_scratch", tmp_path, 1993)
    assert [t.size for t in sc] == [5] * 8
    assert sc.classes_of_tasks()[0] == [24, 17, 36, 35, 16]  # perm(40, 1993), as the reference


def test_skin40_fallback(tmp_path, image_tools):
    make_sd198(tmp_path, image_tools, per_class=6, lists=False)
    raw = raw_load("skin40", tmp_path)
    assert torch.bincount(raw.train.labels).tolist() == [5] * 40
    assert torch.bincount(raw.test.labels).tolist() == [1] * 40
    assert raw.split.startswith("FALLBACK (main_classes_split lists absent)") and "seed 1993" in raw.split
    assert not any("Lichen_Planus" in p for p in raw.train.sources)
    assert raw_load("skin40", tmp_path, seed=5).test.sources == raw.test.sources
    assert_skin40_pixels(raw.test)


def test_skin40_errors(tmp_path, image_tools):
    with pytest.raises(UserError, match=r"SKIN40 \(SD-198\) not found .*cv.nankai.edu.cn/projects/SD-198"):
        raw_load("skin40", tmp_path)
    make_sd198(tmp_path / "a", image_tools, per_class=2, lists=False, classes=SKIN40[:37])
    with pytest.raises(UserError, match=r"needs all 40 class folders .*3 missing: Basal_Cell_Carcinoma, Tinea_Manus, "
                                        r"Dermatofibroma"):
        raw_load("skin40", tmp_path / "a")
    top = make_sd198(tmp_path / "b", image_tools, per_class=2)
    train = top / "main_classes_split" / "train_1.txt"
    text = train.read_bytes()
    train.write_bytes(text.replace(b"Dermatofibroma/039001HB.jpg 39", b"Dermatofibroma/039001HB.jpg 38"))
    with pytest.raises(UserError, match=r"labels Dermatofibroma/039001HB.jpg 38, which is Tinea_Manus .* folder "
                                        r"Dermatofibroma"):
        raw_load("skin40", tmp_path / "b")
    train.write_bytes(text.replace(b"Dermatofibroma/039001HB.jpg 39", b"Dermatofibroma/missing(1).jpg 39"))
    with pytest.raises(UserError, match=r"lists 1 file.* Dermatofibroma/missing\(1\).jpg"):
        raw_load("skin40", tmp_path / "b")
    train.write_bytes(b"".join(line + b"\r\n" for line in text.split(b"\r\n") if line and not line.endswith(b" 39")))
    with pytest.raises(UserError, match="has 39 classes, but SKIN40 has 40"):
        raw_load("skin40", tmp_path / "b")
    train.unlink()
    with pytest.raises(UserError, match="found .*val_1.txt but not .*train_1.txt"):
        raw_load("skin40", tmp_path / "b")
