"""`dynammo pretrain` (its pieces on hand-made inputs: tests/test_pretrain_pieces.py): config errors,
then real `dynammo pretrain` / `dynammo run` subprocesses on real files: the saved backbone loads
with `pretrained: PATH` and gives the pretraining's features, an interrupted pretraining resumes bit
for bit, collapse stops the run, bad inputs are one line; and the one-class first task of a run
without weights is refused before anything is written."""
from __future__ import annotations

import csv
import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from dynammo.cli import main
from dynammo.console import Console
from dynammo.pretrain.knn import knn_accuracy
import method_helpers
from method_helpers import DIGITS_8PX, cli_args
from test_cli_e2e import assert_user_error, wait_for

QUIET = cli_args(method_helpers.QUIET)
TINY = cli_args(DIGITS_8PX, batch_size=16, ssl_max_images=96, knn_bank_per_class=10, knn_test_per_class=5,
                **method_helpers.QUIET)


# ---------------------------------------------------------------- config errors (the CLI, in this process)


@pytest.mark.parametrize("args, needle", [
    (["ssl_method=byol"], "config key 'ssl_method' must be one of simsiam, moco_v2"),
    (["ssl_method=moco_v2", "batch_size=32", "moco_queue=48"], "batch_size=32 does not divide moco_queue=48"),
    (["ssl_method=moco_v2", "batch_size=32", "moco_queue=16"], "moco_queue=16 is smaller than batch_size=32"),
    (["init_cls=1"], "belongs to a continual run"),
    (["-c", "acl"], "is a continual-learning method"),
    (["ssl_exclude_classes=[11]"], "not a class of digits"),
])
def test_bad_pretrain_configs_are_one_line(args, needle, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["pretrain", "--out", str(out), *TINY, *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists()


def test_protocol_gives_its_data_and_backbone_keys_and_holds_out_every_seed_test_split():
    from dynammo.pretrain.config import holdout_seeds, load_pretrain_config

    notices = []
    cfg = load_pretrain_config(["mednist_cpu"], ["data_root=/nowhere"], notices)
    assert (cfg.dataset, cfg.backbone, cfg.img_size, cfg.epochs) == ("mednist", "resnet18", 64, 20)
    assert holdout_seeds(cfg) == [1993, 1994, 1995]
    assert any("not used" in n and "memory_size" in n for n in notices)


def test_held_out_seeds_and_classes_are_kept_out(tmp_path):
    from dynammo.data.datasets import DATASETS
    from dynammo.pretrain.config import load_pretrain_config
    from dynammo.pretrain.data import content_digest, load_pretrain_data, loader_config

    cfg = load_pretrain_config([], ["dataset=digits", "seed=[1,2]", "ssl_exclude_classes=[3]"])
    data = load_pretrain_data(cfg)
    tests = [DATASETS.get("digits")(loader_config(cfg), tmp_path, s).test for s in (1, 2)]
    held = {content_digest(t, i) for t in tests for i in range(len(t))}
    used = [r[2] for r in data.records]
    assert used and not held.intersection(used)
    assert all(r[1] != "3" for r in data.records)
    sel = data.selection
    assert sel["held_out_test_of_seeds"]["seeds"] == [2] and sel["excluded_classes"]["classes"] == ["3"]
    assert "minus" in data.description and len(data.images) == sel["used"]


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def simsiam_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "simsiam"
    proc = cli("pretrain", "--out", str(out), *TINY, "img_size=16", "epochs=2", "simsiam_proj_dim=64",
               "simsiam_pred_dim=16", "tensorboard=true", "plots=true", "knn_every=2")
    assert proc.returncode == 0, proc.stderr
    return out


def test_pretrain_run_directory(simsiam_run):
    out = simsiam_run
    for name in ("config.yaml", "pretrain.json", "metrics.csv", "log.txt", "images.csv", "curves.png",
                 "backbone.pt", "checkpoints/final.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir()) and not (out / "checkpoints" / "partial.pt").exists()
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["status"] == "complete" and summary["ssl_method"] == "simsiam"
    assert summary["images"]["count"] == 96 and "training split under seed 1993" in summary["images"]["description"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0]["knn_acc"] == "" and float(rows[1]["knn_acc"]) == summary["final_knn_acc"]  # knn_every=2
    images = list(csv.DictReader((out / "images.csv").open()))
    assert len(images) == 96 and all(r["image"].startswith("train[") for r in images)
    assert "k-NN accuracy" in (out / "log.txt").read_text()


def test_continual_commands_point_a_pretraining_directory_to_pretrain_resume(simsiam_run, capsys):
    assert main(["resume", str(simsiam_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"dynammo pretrain --resume {simsiam_run}" in err[0]


def test_backbone_loads_with_pretrained_path_and_gives_the_pretraining_features(simsiam_run):
    from dynammo.assembly import build_run
    from dynammo.configure import load_config
    from dynammo.models.backbones import build_backbone
    from dynammo.pretrain.command import read_config
    from dynammo.pretrain.run import Pretraining

    out = simsiam_run
    summary = json.loads((out / "pretrain.json").read_text())
    cfg = load_config(None, ["method=acl", "dataset=digits", "backbone=resnet20", "img_size=16", "progress=false",
                             f"pretrained={out / 'backbone.pt'}", "init_cls=5", "increment=5"])
    _, scenario, engine, method = build_run(cfg)
    loaded = method.net.backbone
    assert method.net.backbone_frozen and not loaded.training
    # the backbone at the end of pretraining, from the final checkpoint
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    ref = build_backbone("resnet20").eval()
    ref.load_state_dict({k[len("backbone."):]: v for k, v in final["state"].items() if k.startswith("backbone.")})
    assert list(engine.test_tf.mean.flatten().tolist()) == pytest.approx(summary["normalization"]["mean"])
    x = engine.test_tf(scenario.test.images[:32])
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    # the k-NN accuracy of the end of pretraining, recomputed through the run's own transform and backbone
    pre = Pretraining(read_config(out), Console(progress="false", quiet=True))
    knn = pre.data.knn
    bank, test = engine.apply(loaded, knn.bank), engine.apply(loaded, knn.test)
    acc = knn_accuracy(bank, knn.bank.labels, test, knn.test.labels, pre.cfg.knn_k, knn.num_classes)
    assert acc == summary["final_knn_acc"]


def test_dynammo_run_trains_on_the_pretrained_backbone(cli, simsiam_run, tmp_path):
    out = tmp_path / "acl"
    proc = cli("run", "--out", str(out), "method=acl", "dataset=digits", "backbone=resnet20", "img_size=16",
               f"pretrained={simsiam_run / 'backbone.pt'}", "init_cls=10", "epochs=1",
               "epochs_finetune=1", "max_train_per_class=8", "max_test_per_class=4", "memory_size=20", *QUIET)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and "trained on task 1" not in " ".join(results["deviations"])


def test_vit_backbone_pretrains_and_loads(tmp_path):
    from dynammo.models.backbones import build_backbone
    from dynammo.pretrain.config import load_pretrain_config
    from dynammo.pretrain.run import Pretraining

    vit = ["backbone=vit_cpu", "vit_patch_size=4", "vit_embed_dim=16", "vit_depth=1", "vit_heads=2"]
    cfg = load_pretrain_config([], [*TINY, "img_size=8", *vit, "epochs=1", "ssl_method=moco_v2", "moco_queue=32"])
    run = Pretraining(cfg, Console(progress="false", quiet=True))
    run.run(tmp_path / "vit")
    state = torch.load(tmp_path / "vit" / "backbone.pt", weights_only=True)
    assert "cls_token" in state and not any(k.startswith("vit.") for k in state)  # timm names
    loaded = build_backbone("vit_cpu", str(tmp_path / "vit" / "backbone.pt"), img_size=8, vit_patch_size=4,
                            vit_embed_dim=16, vit_depth=1, vit_heads=2).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), run.model.backbone.eval()(x))


RESUME = [*TINY, "ssl_method=moco_v2", "moco_momentum=0.99", "moco_queue=32", "epochs=4"]


def start_pretrain(cli, out, *extra):
    return cli.popen("-m", "dynammo", "pretrain", "--out", out, *RESUME, *extra)


def outcome(out):
    """What must be equal bit for bit: the backbone, every network and the queue at the end, the
    optimiser, the monitor's numbers (not the seconds)."""
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    rows = [{k: v for k, v in r.items() if "seconds" not in k} for r in final["rows"]]
    return torch.load(out / "backbone.pt", weights_only=True), final["state"], final["optimizer"]["state"], rows


def assert_same(a, b):
    (bb_a, st_a, opt_a, rows_a), (bb_b, st_b, opt_b, rows_b) = a, b
    assert rows_a == rows_b and len(rows_a) == 4
    assert bb_a.keys() == bb_b.keys() and all(torch.equal(bb_a[k], bb_b[k]) for k in bb_a)
    assert st_a.keys() == st_b.keys() and all(torch.equal(st_a[k], st_b[k]) for k in st_a)
    assert "queue.keys" in st_a and "key_backbone.conv1.weight" in st_a
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)


@pytest.fixture(scope="module")
def uninterrupted(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = start_pretrain(cli, out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return outcome(out)


def test_sigint_mid_epoch_then_resume_equals_uninterrupted(cli, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    proc = start_pretrain(cli, out)
    wait_for(out / "log.txt", "pretrain epoch 1/4:", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("stopped: SIGINT in pretrain moco_v2") and f"dynammo pretrain --resume {out}" in lines[-1]
    assert json.loads((out / "pretrain.json").read_text())["status"] == "interrupted"
    assert (out / "checkpoints" / "partial.pt").is_file() and not (out / "backbone.pt").exists()
    proc = cli("pretrain", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert_same(outcome(out), uninterrupted)
    assert "resuming" in (out / "log.txt").read_text()
    assert_user_error(cli("pretrain", "--resume", str(out)), "is complete; nothing to resume")


def test_sigkill_after_an_epoch_checkpoint_then_resume_equals_uninterrupted(cli, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start_pretrain(cli, out, "checkpoint_every=2")
    wait_for(out / "checkpoints" / "partial.pt", None, proc)  # written after epoch 2 (or, if late, after the fit)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "pretrain.json").read_text())["status"] == "running"
    proc = cli("pretrain", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert_same(outcome(out), uninterrupted)


def test_collapse_stops_the_run_with_one_line_and_keeps_what_was_written(cli, tmp_path):
    out = tmp_path / "collapse"
    # no features reach a spread of 1.0 x 1/sqrt(dim) (their std is at most that), so the check fires after epoch 1
    proc = cli("pretrain", "--out", str(out), *TINY, "epochs=3", "ssl_collapse_std=1.0")
    assert_user_error(proc, "collapsed after epoch 1", "ssl_collapse_std=1.0")
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["status"] == "failed" and "collapsed" in summary["stopped_because"]
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 1
    assert (out / "log.txt").is_file() and not (out / "backbone.pt").exists()


def test_folder_of_unlabeled_images_at_any_depth(cli, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "scans"
    for i in range(40):
        path = root / f"patient{i % 3}" / ("a" if i % 2 else "b/c") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"not an image, and skipped")
    out = tmp_path / "run"
    proc = cli("pretrain", "--out", str(out), f"ssl_folder={root}", "backbone=resnet20", "img_size=8",
               "batch_size=16", "epochs=1", "ssl_augment=medical", "ssl_probe_images=16", *QUIET)
    assert proc.returncode == 0, proc.stderr
    images = [r["image"] for r in csv.DictReader((out / "images.csv").open())]
    assert len(images) == 40 and "patient0/b/c/0.png" in images and not any(".hidden" in i for i in images)
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["knn"] is None and summary["final_knn_acc"] is None and summary["images"]["count"] == 40


def test_bad_folders_are_one_line_and_write_nothing(cli, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    out = tmp_path / "never"
    assert_user_error(cli("pretrain", "--out", str(out), f"ssl_folder={empty}", "img_size=8"),
                      "holds no images", str(empty))
    bad = tmp_path / "bad"
    for i in range(3):
        (bad / "x").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(bad / "x" / f"{i}.png")
    (bad / "x" / "3.png").write_bytes(b"not a png at all")
    assert_user_error(cli("pretrain", "--out", str(out), f"ssl_folder={bad}", "img_size=8"),
                      "cannot be read", "3.png")
    assert not out.exists()


def test_one_class_first_task_without_weights_is_refused_before_anything_is_written(cli, tmp_path):
    out = tmp_path / "never"
    proc = cli("run", "--out", str(out), "method=acl", "dataset=digits", "backbone=resnet20", "img_size=8",
               "init_cls=1", "increment=1", "memory_size=20", "epochs=1", *QUIET)
    assert_user_error(proc, "a one-class first task cannot train a backbone", "dynammo pretrain",
                      "pretrained: PATH", "backbone_epochs=0")
    assert not out.exists()


@pytest.mark.parametrize("method, extra", [("dynammo", {}), ("l2p", {"backbone": "vit_cpu", "vit_patch_size": 4}),
                                           ("acl", {"increment": [1, 4, 5]})])
def test_one_class_first_task_check_in_every_frozen_backbone_method(method, extra, make_cfg):
    from dynammo.errors import UserError
    from dynammo.methods import METHODS

    base = {"method": method, "dataset": "digits", "backbone": "resnet20", "img_size": 8, "init_cls": 1, "increment": 1,
            "memory_size": 20, **extra}
    cls = METHODS.get(method)
    with pytest.raises(UserError, match="one-class first task"):
        cls.check_config(make_cfg(**base), 10)
    cls.check_config(make_cfg(**base, backbone_epochs=0), 10)  # a random frozen backbone is allowed
    cls.check_config(make_cfg(**base, pretrained="weights.pt"), 10)  # weights given: nothing to train on task 1
    cls.check_config(make_cfg(**{**base, "init_cls": 2, "increment": 2}), 10)
