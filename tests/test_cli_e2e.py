"""End-to-end: the real `dynammo` CLI and `main.py` in subprocesses, on real files."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from method_helpers import DIGITS_8PX, cli_args

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DYNAMMO_SHARED_DATA", ROOT.parent / "shared" / "data"))
TINY = cli_args(DIGITS_8PX, epochs=1, max_train_per_class=20, batch_size=32, progress="false", tensorboard="true")


def wait_for(path, needle, proc, timeout=300):
    """Poll until `path` exists (and holds `needle`, unless None) while `proc` still runs."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and (needle is None or needle in path.read_text(errors="replace")):
            return
        assert proc.poll() is None, f"the run ended before '{needle}' in {path}: {proc.stderr.read()[-3000:]}"
        time.sleep(0.01)
    raise AssertionError(f"'{needle}' never appeared in {path}")


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got: {proc.stderr}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def replay_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "replay"
    proc = cli("run", "--out", str(out), "method=replay", "memory_size=20", *TINY)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_directory_is_complete(replay_run):
    out, proc = replay_run
    for name in ("config.yaml", "results.json", "metrics.csv", "log.txt", "plots/accuracy.png",
                 "plots/acc_matrix.png", "plots/confusion.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"task_{i}.pt" for i in range(5)]
    assert any((out / "tb").iterdir())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "replay" and cfg["epochs"] == 1 and cfg["memory_size"] == 20


def test_results_json_fields_and_consistency(replay_run):
    out, _ = replay_run
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete"
    for key in ("method", "dataset", "backbone", "seed", "class_order", "tasks", "acc_matrix", "acc", "mcr",
                "task_il_acc", "avg_acc", "last_acc", "forgetting", "bwt", "cost", "versions"):
        assert key in r, key
    assert r["method"] == "replay" and r["dataset"] == "digits" and r["seed"] == 1993
    assert sorted(r["class_order"]) == list(range(10))
    assert [len(t) for t in r["tasks"]] == [2] * 5
    assert sum(r["tasks"], []) == r["class_order"]
    a = r["acc_matrix"]
    assert len(a) == 5 and all(a[j][i] is None for j in range(5) for i in range(j + 1, 5))
    assert r["avg_acc"] == pytest.approx(np.mean(r["acc"]))
    assert r["last_acc"] == r["acc"][-1]
    assert r["bwt"] == pytest.approx(np.mean([a[4][i] - a[i][i] for i in range(4)]))
    assert len(r["cost"]) == 5
    c = r["cost"][-1]
    assert c["memory_exemplars"] == 20 and c["memory_bytes"] == 20 * 1 * 8 * 8
    assert c["inference_gflops"] > 0 and c["params_total"] >= c["params_trainable"] > 0
    # the confusion matrix after the last task agrees with the last accuracy
    cm = np.array(r["confusion"])
    assert cm.shape == (10, 10)
    assert 100.0 * np.trace(cm) / cm.sum() == pytest.approx(r["last_acc"])


def test_metrics_csv_and_log(replay_run):
    out, proc = replay_run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    r = json.loads((out / "results.json").read_text())
    assert [int(row["task"]) for row in rows] == [1, 2, 3, 4, 5]
    assert [float(row["acc"]) for row in rows] == pytest.approx(r["acc"])
    assert [float(row["ece"]) for row in rows] == pytest.approx(r["ece"])
    # open-set columns: a value while unseen classes remain, an empty cell after the last task
    assert [float(row["openset_auroc"]) for row in rows[:-1]] == pytest.approx(r["openset"]["auroc"][:-1])
    assert rows[-1]["openset_auroc"] == "" and rows[-1]["openset_fpr95"] == ""
    log = (out / "log.txt").read_text()
    assert "task 5/5 done" in log and "avg acc" in log
    assert f"avg ece {r['avg_ece']:.2f}" in log and f"open-set avg auroc {r['openset']['avg_auroc']:.2f}" in log
    assert "after task" in proc.stdout  # the table of accuracy after each task


def test_seed_list_runs_each_seed_and_summarises(cli, tmp_path):
    proc = cli("run", "--out", str(tmp_path / "s"), "method=finetune", "seed=[1,2]", "init_cls=5",
               "increment=5", *TINY)
    assert proc.returncode == 0, proc.stderr
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    r1 = json.loads((tmp_path / "s" / "seed1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "s" / "seed2" / "results.json").read_text())
    assert s["seeds"] == [1, 2]
    assert s["avg_acc"]["mean"] == pytest.approx((r1["avg_acc"] + r2["avg_acc"]) / 2)
    assert r1["class_order"] != r2["class_order"]  # the seed shuffles the class order


def test_joint_trains_on_all_seen_classes(cli, tmp_path):
    proc = cli("run", "--out", str(tmp_path / "j"), "method=joint", "init_cls=5", "increment=5", *TINY)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "j" / "results.json").read_text())
    assert r["cost"][1]["memory_exemplars"] == 0
    # the second task's model was trained on all 10 classes: its head has 10 outputs
    assert r["cost"][1]["params_total"] == r["cost"][0]["params_total"] + 5 * (64 + 1)


def test_list_shows_methods_datasets_backbones(cli):
    proc = cli("list")
    assert proc.returncode == 0
    for word in ("replay", "finetune", "joint", "digits", "mednist", "folder", "csv", "bloodmnist",
                 "resnet18", "resnet32", "resnet18_cifar"):
        assert word in proc.stdout, word
    keys = cli("list", "--keys")
    assert "max_train_per_class" in keys.stdout and "sampling_method" in keys.stdout


def test_reference_main_py_with_nested_config(cli, tmp_path):
    cfg = {
        "basic": {"model_name": "finetune_il", "dataset": "digits", "convnet_type": "resnet20", "random_seed": 7,
                  "init_cls": 5, "increment": 5, "save_models": False},
        "options": {"digits": {"resnet20": {"epochs": 1, "batch_size": 32, "lrate": 0.05, "opt_type": "sgd",
                                            "img_size": 8, "max_train_per_class": 20}}},
    }
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli.python(ROOT / "main.py", "--config", path, "--device", "-1", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["method"] == "finetune" and r["seed"] == 7 and r["backbone"] == "resnet20"
    assert "save_models" in proc.stdout  # the ignored reference key is reported


# ---------------- bad input: one clear line, exit status 2, nothing written ----------------

@pytest.mark.parametrize("override,needle", [
    ("epochs=2.5", "'epochs' must be an integer"),
    ("lrat=0.1", "did you mean 'lrate'"),
    ("method=replai", "did you mean 'replay'"),
    ("dataset=mednits", "did you mean 'mednist'"),
    ("backbone=resnet19", "unknown backbone"),
    ("opt_type=sgdd", "must be one of"),
    ("batch_size=0", "'batch_size' must be >= 1"),
    ("increment=3", "does not divide"),
    ("init_cls=11", "more classes than the dataset has"),
    ("memory_size=5", "smaller than the number of classes"),
    ("shuffle=maybe", "must be true or false"),
    ("epochs=-1", "'epochs' must be >= 1"),
    ("memory_size=-5", "'memory_size' must be >= 0"),
    ("img_size=0", "'img_size' must be in [4, "),
    ("lrate=fast", "'lrate' must be a number"),
    ("checkpoint_every=-2", "'checkpoint_every' must be >= 0"),
])
def test_bad_config_values(cli, tmp_path, override, needle):
    out = tmp_path / "never"
    args = ["run", "--out", str(out), "method=replay", "memory_size=20", *TINY, override]
    proc = cli(*args)
    assert_user_error(proc, needle)
    assert not out.exists()


def test_missing_config_file_and_bad_yaml(cli, tmp_path):
    assert_user_error(cli("run", "-c", str(tmp_path / "nope.yaml")), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: replay\n  epochs: [1,\n")
    assert_user_error(cli("run", "-c", str(bad)), "not valid YAML")


def test_missing_dataset_folder(cli, tmp_path):
    out = tmp_path / "never"
    proc = cli("run", "--out", str(out), "dataset=mednist", f"data_root={tmp_path / 'nothing'}", "epochs=1")
    assert_user_error(proc, "MedNIST not found", "data_root")
    assert not out.exists()


def test_empty_class_folder_and_corrupt_image(cli, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "c").mkdir()
    out = tmp_path / "never"
    proc = cli("run", "--out", str(out), "dataset=folder", f"data_root={root}", "init_cls=1", "increment=1", "epochs=1")
    assert_user_error(proc, "holds no images", str(root / "c"))
    (root / "c").rmdir()
    (root / "b" / "3.png").write_bytes(b"not a png at all")
    proc = cli("run", "--out", str(out), "dataset=folder", f"data_root={root}", "init_cls=1", "increment=1", "epochs=1")
    assert_user_error(proc, "cannot be read", "3.png")
    assert not out.exists()


def test_corrupt_npz(cli, tmp_path):
    (tmp_path / "bloodmnist.npz").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "never"
    proc = cli("run", "--out", str(out), "dataset=bloodmnist", f"data_root={tmp_path}", "epochs=1")
    assert_user_error(proc, "corrupt or truncated", "bloodmnist.npz")
    assert not out.exists()


def test_run_dir_holding_a_run_is_refused(cli, replay_run):
    out, _ = replay_run
    before = (out / "results.json").read_bytes()
    proc = cli("run", "--out", str(out), "method=replay", "memory_size=20", *TINY)
    assert_user_error(proc, "already holds a run")
    assert (out / "results.json").read_bytes() == before


# ---------------- real data ----------------

needs_mednist = pytest.mark.skipif(not (SHARED / "mednist.tar.gz").is_file(),
                                   reason=f"real MedNIST not found at {SHARED} (the ../shared/data folder)")


@needs_mednist
def test_replay_config_on_real_mednist(cli, tmp_path):
    out = tmp_path / "mednist"
    proc = cli("run", "-c", "mednist_cpu", "-c", "replay", "--out", str(out), "seed=1993",
               f"data_root={SHARED}", "epochs=1", "max_train_per_class=30", "max_test_per_class=30",
               "img_size=32", "memory_size=30", "progress=false")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["dataset"] == "mednist" and len(r["tasks"]) == 3
    assert sorted(r["class_names"]) == ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    assert r["cost"][-1]["memory_exemplars"] == 30
    assert r["cost"][-1]["memory_bytes"] == 30 * 32 * 32
