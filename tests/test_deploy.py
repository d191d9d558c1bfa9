"""`dynammo export`, `dynammo predict` and `dynammo cost` on real runs of the CLI."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dynammo.console import Console
from dynammo.data.imageset import ImageSet
from dynammo.deploy import DeployedClassifier, load_exported
from dynammo.prediction import decision
from dynammo.run.build import prepare
from dynammo.run.restore import restore_method
from dynammo.rundir import load_checkpoint, read_run_config
from test_cli_e2e import SHARED, assert_user_error, needs_mednist

SMALL = ["epochs=1", "batch_size=32", "progress=false", "plots=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def dynammo_mednist(cli, tmp_path_factory):
    """A real DynaMMo run on real MedNIST images (3 tasks x 2 classes), exported."""
    if not (SHARED / "mednist.tar.gz").is_file():
        pytest.skip(f"real MedNIST not found at {SHARED} (the ../shared/data folder)")
    root = tmp_path_factory.mktemp("deploy")
    run_dir, model = root / "run", root / "model.pt"
    proc = cli("run", "-c", "mednist_cpu", "-c", "dynammo", "--out", str(run_dir), f"data_root={SHARED}", "seed=1993",
               "backbone=resnet20", "img_size=32", "max_train_per_class=30", "max_test_per_class=20",
               "memory_size=30", "epochs_finetune=1", "backbone_epochs=2", *SMALL)
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", str(run_dir), "--out", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "after task 3/3" in proc.stdout
    return run_dir, model


@pytest.fixture(scope="module")
def replay_digits(cli, tmp_path_factory):
    """A real Replay run on digits (a plain softmax head), exported after task 1 and after the last."""
    root = tmp_path_factory.mktemp("deploy_digits")
    run_dir = root / "run"
    proc = cli("run", "--out", str(run_dir), "method=replay", "dataset=digits", "backbone=resnet20", "img_size=8",
               "max_train_per_class=20", "memory_size=20", *SMALL)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def framework_decisions(run_dir):
    """(test set, pred, confidence) of the checkpointed model inside the framework, on the run's data."""
    cfg = read_run_config(run_dir)
    _, scenario, engine, _ = prepare(cfg, Console(progress="false", quiet=True))
    method = restore_method(cfg, load_checkpoint(run_dir / "checkpoints" / f"task_{len(scenario) - 1}.pt"))
    test = scenario.test_data_seen(scenario.tasks[-1])
    pred, conf = decision(engine.apply(method.predict, test))
    return scenario, test, pred, conf


def check_export_equals_framework(run_dir, model_file):
    scenario, test, pred, conf = framework_decisions(run_dir)
    model, meta = load_exported(model_file)
    with torch.no_grad():  # a keep_aspect run's program also takes each image's original height / width
        e_pred, e_conf = model(test.images, *([test.aspect] if "aspect" in meta["inputs"] else []))
    assert torch.equal(e_pred, pred)
    assert torch.allclose(e_conf, conf, atol=1e-5)
    assert meta["class_names"] == scenario.class_names  # index = class id of the predictions
    acc = 100.0 * (e_pred == test.labels).double().mean().item()  # float32 is off by 1e-6
    assert acc == pytest.approx(json.loads((run_dir / "results.json").read_text())["acc"][-1], abs=1e-6)
    return scenario, test, model, meta


@needs_mednist
def test_exported_dynammo_equals_the_framework_model(dynammo_mednist):
    run_dir, model_file = dynammo_mednist
    _, _, _, meta = check_export_equals_framework(run_dir, model_file)
    assert (meta["method"], meta["dataset"], meta["task"]) == ("dynammo", "mednist", 3)
    assert sorted(meta["class_names"]) == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]


def test_export_applies_the_runs_centre_crop(cli, tmp_path):
    """test_crop=center (Resize(side*256/224) + CenterCrop, the prompt protocols' test view): the
    exported model crops as evaluation does, so it gives the run's predictions and confidences."""
    run_dir, model_file = tmp_path / "run", tmp_path / "model.pt"
    proc = cli("run", "--out", str(run_dir), "method=replay", "dataset=digits", "backbone=resnet20", "img_size=16",
               "max_train_per_class=20", "memory_size=20", "init_cls=5", "increment=5", "test_crop=center", *SMALL)
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", str(run_dir), "--out", str(model_file))
    assert proc.returncode == 0, proc.stderr
    _, test, model, meta = check_export_equals_framework(run_dir, model_file)
    assert (meta["test_crop"], meta["keep_aspect"], meta["inputs"]) == ("center", False, ["images"])
    cfg = read_run_config(run_dir)
    method = restore_method(cfg, load_checkpoint(run_dir / "checkpoints" / "task_1.pt"))
    method.eval_mode()
    plain = DeployedClassifier(method, meta["mean"], meta["std"])  # no crop: what the export did before
    with torch.no_grad():
        assert not torch.allclose(plain(test.images)[1], model(test.images)[1], atol=1e-3)


def test_export_and_predict_crop_on_each_files_original_geometry(cli, tmp_path):
    """keep_aspect + test_crop=center on images of several aspect ratios: the exported program takes
    each image's original height / width, and `dynammo predict` on the original files (read from their
    headers) gives what evaluation gives on the same files."""
    from test_paper_transforms import _write_folder

    shapes = [(40, 20), (20, 40), (30, 30), (50, 25), (24, 48), (36, 24)]
    _write_folder(tmp_path / "data" / "train", shapes)
    _write_folder(tmp_path / "data" / "test", shapes[::-1])
    run_dir, model_file = tmp_path / "run", tmp_path / "model.pt"
    proc = cli("run", "--out", str(run_dir), "method=finetune", "dataset=folder", f"data_root={tmp_path / 'data'}",
               "backbone=resnet20", "img_size=16", "init_cls=2", "increment=2", "memory_size=0",
               "test_crop=center", "keep_aspect=true", *SMALL)
    assert proc.returncode == 0, proc.stderr
    proc = cli("export", str(run_dir), "--out", str(model_file))
    assert proc.returncode == 0, proc.stderr
    _, test, model, meta = check_export_equals_framework(run_dir, model_file)
    assert meta["inputs"] == ["images", "aspect"] and len(set(test.aspect.tolist())) > 1
    with torch.no_grad():  # the aspect is used: all-square ratios crop elsewhere
        assert not torch.allclose(model(test.images, torch.ones(len(test)))[1], model(test.images, test.aspect)[1])
    # the framework on the original files, loaded lazily as a run loads them
    cfg = read_run_config(run_dir)
    _, scenario, engine, _ = prepare(cfg, Console(progress="false", quiet=True))
    method = restore_method(cfg, load_checkpoint(run_dir / "checkpoints" / "task_0.pt"))
    files = sorted((tmp_path / "data" / "test").rglob("*.png"))
    lazy = ImageSet(torch.zeros(len(files)), sources=[str(f) for f in files], channels=3, size=16).with_aspect()
    pred, conf = decision(engine.apply(method.predict, lazy))
    proc = cli("predict", str(model_file), *map(str, files), "--csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [int(r["class_id"]) for r in rows] == pred.tolist()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(conf.tolist(), abs=1e-5)


def write_pngs(folder, test, idx):
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, i in enumerate(idx):
        arr = test.images[i].numpy()
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        path = folder / f"img_{k:02d}.png"
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
        files.append(path)
    return files


@needs_mednist
def test_predict_prints_class_and_confidence_per_image(cli, dynammo_mednist, tmp_path):
    run_dir, model_file = dynammo_mednist
    scenario, test, pred, conf = framework_decisions(run_dir)
    idx = torch.linspace(0, len(test) - 1, 7).long().tolist()  # images of several classes
    files = write_pngs(tmp_path / "images", test, idx)
    proc = cli("predict", str(model_file), *map(str, files), "--csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["image"] for r in rows] == [str(f) for f in files]
    for r, i in zip(rows, idx):
        assert int(r["class_id"]) == pred[i].item()
        assert r["class"] == scenario.class_names[pred[i].item()]
        assert float(r["confidence"]) == pytest.approx(conf[i].item(), abs=1e-5)
    # a folder argument: every image inside, sorted; plain output is one line per image
    proc = cli("predict", str(model_file), str(tmp_path / "images"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(files)
    first = lines[0].split()
    assert first[0] == str(files[0]) and first[1] == rows[0]["class"]
    assert float(first[2]) == pytest.approx(float(rows[0]["confidence"]), abs=1e-4)


def test_export_of_an_earlier_task_and_bad_inputs(cli, replay_digits, tmp_path):
    model_file = tmp_path / "task1.pt"
    proc = cli("export", str(replay_digits), "--out", str(model_file), "--task", "1")
    assert proc.returncode == 0, proc.stderr
    _, meta = load_exported(model_file)
    r = json.loads((replay_digits / "results.json").read_text())
    assert meta["task"] == 1 and len(meta["class_names"]) == len(r["tasks"][0])

    assert_user_error(cli("export", str(replay_digits), "--out", str(tmp_path / "x.pt"), "--task", "9"),
                      "no checkpoint after task 9", "available: 1, 2, 3, 4, 5")
    assert_user_error(cli("export", str(tmp_path), "--out", str(tmp_path / "x.pt")), "not a run directory")
    assert not (tmp_path / "x.pt").exists()
    assert_user_error(cli("predict", str(model_file), str(tmp_path / "missing.png")), "missing.png", "does not exist")
    not_model = tmp_path / "not_a_model.pt"
    not_model.write_bytes(b"garbage")
    assert_user_error(cli("predict", str(not_model), str(tmp_path)), "not a model written by `dynammo export`")
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    assert_user_error(cli("predict", str(model_file), str(bad_image)), "bad.png", "cannot be read")


def test_truncated_checkpoint_is_refused(cli, replay_digits, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(replay_digits, copy)
    ckpt = sorted((copy / "checkpoints").glob("task_*.pt"))[-1]
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_user_error(cli("export", str(copy), "--out", str(tmp_path / "m.pt")), "damaged", ckpt.name)


def test_cost_table_of_a_config(cli):
    """`dynammo cost` prints a table from a config alone (no run); that it equals the cost a run
    records is checked for every method in tests/test_method_contract.py."""
    proc = cli("cost", "method=acl", "dataset=digits", "backbone=resnet20", "img_size=8", "init_cls=4",
               "increment=3", "memory_size=20")
    assert proc.returncode == 0, proc.stderr
    table = [l for l in proc.stdout.splitlines() if l.startswith("| ") and l[2].isdigit()]
    gflops = [float(l.split("|")[3]) for l in table]
    assert len(gflops) == 3 and gflops[2] > gflops[1] > gflops[0]  # ACL: one path per task
