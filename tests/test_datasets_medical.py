"""The medical fixed-split benchmarks PATH16 and SKIN7 (SKIN8, SKIN40: test_datasets_skin8_skin40.py)
on tiny generated files in each source's exact on-disk layout: class ids and names, split sizes, the reference task pairs, the
seeded fallbacks and every one-line error."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dynammo.configure import build_config, load_config
from dynammo.data import load_data
from dynammo.data.datasets import DATASETS, skin7
from dynammo.data.scenario import Scenario
from dynammo.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


def raw_load(name, root, seed=1, **kw):
    cfg = build_config({"dataset": name, "data_root": str(root), **kw})
    return DATASETS.get(name)(cfg, Path(root), seed)


def value_of(label: int) -> int:
    return 10 + 12 * label  # the grey level of a class's images: tells the class back from the pixels


def write_jpg(image_tools, path: Path, value: int) -> Path:
    return image_tools.write(path, image_tools.const(value, 8, rgb=True), "JPEG")


def assert_pixels_match_labels(part):
    mem = part.materialize()
    got = mem.images[:, 0, 0, 0].to(torch.int64)
    want = torch.tensor([value_of(int(y)) for y in mem.labels])
    assert (got - want).abs().max() <= 3, (got.tolist(), want.tolist())


def scenario(protocol, root, seed, *extra):
    cfg = load_config([protocol, "finetune"], [f"data_root={root}", "img_size=8", "pretrained=false", *extra])
    data = load_data(cfg, seed)
    return data, Scenario.from_config(data, cfg, seed)


def task_names(data, sc):
    return [{data.class_names[c] for c in task} for task in sc.classes_of_tasks()]


def crlf(lines) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


# ---------------------------------------------------------------- PATH16

# subset -> class folders, deliberately unsorted (the ids must come from sorted names)
PATH16 = {"MHIST": ["SSA", "HP"], "breast_cancer": ["malignant", "benign"], "oral_cancer": ["OSCC", "Normal"],
          "Patch_Camelyon": ["tumor", "normal"], "TCGA_STD": ["TUM", "STR", "NORM", "LYM"],
          "lung": ["lung_scc", "lung_aca"], "colon": ["colon_n", "colon_aca"]}
PATH16_NAMES = [f"{s}/{c}" for s, cs in PATH16.items() for c in sorted(cs)]


def make_path16(root: Path, image_tools, n_train=2, n_test=1) -> Path:
    top = root / "Pathology16"
    for subset, classes in PATH16.items():
        for cls in classes:
            label = PATH16_NAMES.index(f"{subset}/{cls}")
            for split, n in (("train", n_train), ("test", n_test)):
                for i in range(n):
                    write_jpg(image_tools, top / subset / split / cls / f"{cls}_{i}.jpg", value_of(label))
    return top


def test_path16_ids_follow_subset_order_then_sorted_folders(tmp_path, image_tools, reversed_listing):
    top = make_path16(tmp_path, image_tools)
    raw = raw_load("path16", tmp_path, shuffle=False)
    assert raw.name == "path16" and raw.class_names == PATH16_NAMES
    assert raw.class_names[:2] == ["MHIST/HP", "MHIST/SSA"]  # sorted, not listing order
    assert torch.bincount(raw.train.labels).tolist() == [2] * 16
    assert torch.bincount(raw.test.labels).tolist() == [1] * 16
    assert_pixels_match_labels(raw.train)
    assert_pixels_match_labels(raw.test)
    assert raw.flip and "Pathology16" in raw.split
    assert raw_load("path16", top, shuffle=False).class_names == PATH16_NAMES  # data_root = Pathology16/ itself
    assert DATASETS.get("pathology16") is DATASETS.get("path16")


def test_path16_protocol_gives_one_task_per_subset(tmp_path, image_tools):
    make_path16(tmp_path, image_tools, n_train=1)
    data, sc = scenario("path16_acl", tmp_path, 1)
    assert [t.size for t in sc] == [2, 2, 2, 2, 4, 2, 2]
    assert [{n.split("/")[0] for n in names} for names in task_names(data, sc)] == [{s} for s in PATH16]


def test_path16_refuses_a_class_shuffle(tmp_path, image_tools):
    make_path16(tmp_path, image_tools, n_train=1)
    with pytest.raises(UserError, match="shuffle=true would mix classes of different pathology datasets"):
        raw_load("path16", tmp_path, shuffle=True)
    order = list(range(15, -1, -1))
    assert raw_load("path16", tmp_path, shuffle=True, class_order=order).class_names == PATH16_NAMES


def test_path16_missing_data_subset_split_and_wrong_counts(tmp_path, image_tools):
    with pytest.raises(UserError, match=r"PATH16 not found under .*/<subset>/\{train,test\}.*arXiv 2304.09042"):
        raw_load("path16", tmp_path, shuffle=False)
    top = make_path16(tmp_path, image_tools, n_train=1)
    shutil.rmtree(top / "lung")
    with pytest.raises(UserError, match=r"lacks the subset folder\(s\) .*lung; expected"):
        raw_load("path16", tmp_path, shuffle=False)
    make_path16(tmp_path, image_tools, n_train=1)
    shutil.rmtree(top / "colon" / "test")
    with pytest.raises(UserError, match=r"subset folder .*colon/test does not exist"):
        raw_load("path16", tmp_path, shuffle=False)
    make_path16(tmp_path, image_tools, n_train=1)
    shutil.rmtree(top / "TCGA_STD" / "train" / "LYM")
    shutil.rmtree(top / "TCGA_STD" / "test" / "LYM")
    with pytest.raises(UserError, match=r"TCGA_STD has 3 class folders \(NORM, STR, TUM\), but TCGA_STD has 4"):
        raw_load("path16", tmp_path, shuffle=False)
    make_path16(tmp_path, image_tools, n_train=1)
    (top / "MHIST" / "test" / "SSA").rename(top / "MHIST" / "test" / "SSA_")
    with pytest.raises(UserError, match="train has class folders HP, SSA but test has HP, SSA_"):
        raw_load("path16", tmp_path, shuffle=False)


def test_path16_corrupt_image_is_one_line(tmp_path, image_tools):
    top = make_path16(tmp_path, image_tools, n_train=1)
    bad = top / "colon" / "train" / "colon_n" / "colon_n_0.jpg"
    bad.write_bytes(b"not a jpeg")
    raw = raw_load("path16", tmp_path, shuffle=False)
    with pytest.raises(UserError, match=f"image {bad} cannot be read"):
        raw.train.materialize()


# ---------------------------------------------------------------- SKIN7 (ISIC 2018 Task 3 / HAM10000)

SKIN7_PER_CLASS = 5


def skin7_ids():
    """[(image id, class id)]: SKIN7_PER_CLASS images per class, classes interleaved in id order."""
    return [(f"ISIC_{24306 + i:07d}", i % 7) for i in range(7 * SKIN7_PER_CLASS)]


def write_skin7_images(folder: Path, image_tools, ids):
    for image_id, label in ids:
        write_jpg(image_tools, folder / f"{image_id}.jpg", value_of(label))


def write_gt_csv(path: Path, ids, columns, names, unk=False):
    lines = ["image," + ",".join(columns)]
    for image_id, label in ids:
        lines.append(image_id + "," + ",".join("1.0" if c == names[label] else "0.0" for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_split_csvs(top: Path, ids, relabel=lambda y: y):
    test = {i for i, (_, y) in enumerate(ids) if i // 7 == 0}  # the first image of each class
    for split, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
        rows = [f"{image_id}.jpg,{relabel(y)}" for i, (image_id, y) in enumerate(ids) if keep(i)]
        path = top / "split_data" / f"split_data_1_fold_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(crlf([f"image_{split},label_{split}"] + rows))


def test_skin7_reference_csv_layout(tmp_path, image_tools):
    top = tmp_path / "ISIC_2018_Classification"
    ids = skin7_ids()
    write_skin7_images(top / "ISIC2018_Task3_Training_Input", image_tools, ids)
    write_split_csvs(top, ids)
    raw = raw_load("skin7", tmp_path)
    assert raw.class_names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert torch.bincount(raw.train.labels).tolist() == [4] * 7
    assert torch.bincount(raw.test.labels).tolist() == [1] * 7
    assert_pixels_match_labels(raw.train)
    assert "split_data_1_fold_train.csv" in raw.split and "unverified" in raw.split
    assert raw_load("isic2018", top).class_names == raw.class_names  # data_root = the top folder itself


def test_skin7_csv_labels_are_named_from_the_ground_truth(tmp_path, image_tools):
    top = tmp_path / "ISIC_2018_Classification"
    ids = skin7_ids()
    write_skin7_images(top / "ISIC2018_Task3_Training_Input", image_tools, ids)
    write_gt_csv(top / "ISIC2018_Task3_Training_GroundTruth" / skin7.GT_CSV, ids, skin7.CLASS_NAMES,
                 skin7.CLASS_NAMES)
    write_split_csvs(top, ids)
    raw = raw_load("skin7", tmp_path)
    assert raw.class_names == skin7.CLASS_NAMES and "checked against" in raw.split
    write_split_csvs(top, ids, relabel=lambda y: (y + 1) % 7)  # CSV labels in another (consistent) order
    raw = raw_load("skin7", tmp_path)
    assert raw.class_names == skin7.CLASS_NAMES[-1:] + skin7.CLASS_NAMES[:-1]
    rows = (top / "split_data" / "split_data_1_fold_train.csv").read_bytes().split(b"\r\n")
    rows[1] = rows[1][:-1] + (b"5" if not rows[1].endswith(b"5") else b"6")  # one image with another class's label
    (top / "split_data" / "split_data_1_fold_train.csv").write_bytes(b"\r\n".join(rows))
    with pytest.raises(UserError, match="the split CSV and the ground truth disagree"):
        raw_load("skin7", tmp_path)


def test_skin7_official_and_ham10000_layouts_give_the_same_fallback_split(tmp_path, image_tools):
    ids = skin7_ids()
    official = tmp_path / "official"
    write_skin7_images(official / "ISIC2018_Task3_Training_Input", image_tools, ids)
    write_gt_csv(official / skin7.GT_CSV, ids, skin7.CLASS_NAMES, skin7.CLASS_NAMES)
    ham = tmp_path / "ham"
    write_skin7_images(ham / "HAM10000_images_part_1", image_tools, ids[:20])
    write_skin7_images(ham / "HAM10000_images_part_2", image_tools, ids[20:])
    meta = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    meta += [f"HAM_{i:07d},{image_id},{skin7.CLASS_NAMES[y].lower()},histo,50.0,male,back"
             for i, (image_id, y) in enumerate(reversed(ids))]
    (ham / "HAM10000_metadata.csv").write_text("\n".join(meta) + "\n")
    a, b = raw_load("skin7", official), raw_load("ham10000", ham)
    for raw in (a, b):
        assert raw.class_names == skin7.CLASS_NAMES and raw.split.startswith("FALLBACK")
        assert torch.bincount(raw.train.labels).tolist() == [4] * 7  # round(5 * 0.2) = 1 test per class
        assert_pixels_match_labels(raw.test)
    name = lambda part: [Path(p).name for p in part.sources]
    assert name(a.test) == name(b.test) and name(a.train) == name(b.train)
    assert raw_load("skin7", official, seed=7).test.sources == a.test.sources  # fixed split seed, not the run seed


def test_skin7_errors(tmp_path, image_tools):
    with pytest.raises(UserError, match=r"SKIN7 .* not found .*challenge.isic-archive.com.*doi:10.7910/DVN/DBW86T"):
        raw_load("skin7", tmp_path)
    ids = skin7_ids()
    images = tmp_path / "ISIC2018_Task3_Training_Input"
    write_skin7_images(images, image_tools, ids)
    with pytest.raises(UserError, match="has images but no labels"):
        raw_load("skin7", tmp_path)
    gt = tmp_path / skin7.GT_CSV
    write_gt_csv(gt, ids, ["MEL", "NV", "BCC", "AKIEC", "BKL", "VASC", "DF"], skin7.CLASS_NAMES)
    with pytest.raises(UserError, match="has header .* expected 'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC'"):
        raw_load("skin7", tmp_path)
    write_gt_csv(gt, [(i, y) for i, y in ids if y != 6], skin7.CLASS_NAMES, skin7.CLASS_NAMES)
    with pytest.raises(UserError, match="has 6 classes, but SKIN7 has 7"):
        raw_load("skin7", tmp_path)
    write_gt_csv(gt, ids + [("ISIC_0099999", 0)], skin7.CLASS_NAMES, skin7.CLASS_NAMES)
    with pytest.raises(UserError, match="names 1 image.* not found in .*: ISIC_0099999"):
        raw_load("skin7", tmp_path)
    write_split_csvs(tmp_path, ids)
    (tmp_path / "split_data" / "split_data_1_fold_test.csv").unlink()
    with pytest.raises(UserError, match="split CSV .*split_data_1_fold_test.csv does not exist"):
        raw_load("skin7", tmp_path)


# ---------------------------------------------------------------- listing


def test_dynammo_list_shows_the_medical_datasets(capsys):
    from dynammo.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ("  path16 (pathology16): Pathology16/<subset>/{train,test}/<class>/<image>",
                 "  skin7 (ham10000, isic2018): ISIC_2018_Classification/",
                 "  skin8 (isic2019): ISIC2019/Data/<CLASS>/",
                 "  skin40 (sd-198, sd198): SD-198/images/<Class_Name>/"):
        assert line in out, line
    for name in ("skin40_scratch", "skin8_scratch"):
        assert f"  {name} " in out
