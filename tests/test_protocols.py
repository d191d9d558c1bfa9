"""Protocols and method files: composition, what each may hold, the protocol record of a run, and
that every shipped protocol puts every method on the same footing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dynammo.cli import main as cli_main
from dynammo.config_yaml import read_yaml
from dynammo.configure import load_config
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.protocols import (METHOD_DIR, PROTOCOL_KEYS, protocol_names, protocol_path, protocol_record,
                               read_protocol, shipped_method_file)

REQUIRED = {"mednist_cpu", "digits", "cifar100_acl", "path16_acl", "skin8_acl", "cifar100_icarl", "cifar100_b50",
            "cifar100_wa", "cifar100_der"}


def test_the_required_protocols_ship_inside_the_package():
    assert REQUIRED <= set(protocol_names())
    import dynammo

    for name in REQUIRED:  # package data, not the repository's folder
        assert protocol_path(name).is_relative_to(Path(dynammo.__file__).parent)


@pytest.mark.parametrize("name", protocol_names())
def test_a_protocol_holds_only_protocol_keys(name):
    values = read_yaml(protocol_path(name))
    assert values["protocol"] == name
    assert set(values) - {"protocol", "data_root"} <= set(PROTOCOL_KEYS)


def test_no_shipped_method_file_sets_a_protocol_key():
    files = sorted(METHOD_DIR.glob("*/*.yaml"))
    assert len(files) > 50
    for path in files:
        assert not set(read_yaml(path)) & set(PROTOCOL_KEYS), path
        assert path.parent.name in METHODS.names(), path
        assert path.stem in protocol_names() or path.stem == "default", path


@pytest.mark.parametrize("name", protocol_names())
def test_every_method_gets_the_protocol_values_unchanged(name):
    """The protocol's keys are the same whichever method runs (the mednist_cpu drift: 200 vs 300)."""
    protocol = read_protocol(name)
    replay = load_config([name, "replay"])
    for method in METHODS.names():
        notes: list = []
        cfg = load_config([name, method], notices=notes)
        assert cfg.protocol == name and cfg.method == method
        for key in PROTOCOL_KEYS:
            if key in protocol:
                assert cfg[key] == replay[key], (method, key)
        assert not protocol_record(cfg)["departs"], (method, protocol_record(cfg)["departs"])
        assert not [n for n in notes if "protocol key" in n], notes


def test_mednist_cpu_gives_every_rehearsal_method_the_same_memory():
    memories = {m: load_config(["mednist_cpu", m]).memory_size for m in METHODS.names()}
    assert set(memories.values()) == {200}


def test_method_file_keys_are_applied_for_the_named_protocol():
    path = shipped_method_file("dynammo", "mednist_cpu")
    own = read_yaml(path)
    cfg = load_config(["mednist_cpu", "dynammo"])
    assert cfg.epochs_finetune == own["epochs_finetune"] == 15
    # method=NAME picks the same file as -c NAME
    assert load_config(["mednist_cpu"], ["method=dynammo"]) == cfg


def test_later_layers_win_and_a_changed_protocol_key_is_reported(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("memory_size: 300\nlrate: 0.3\n")
    notes: list = []
    cfg = load_config(["mednist_cpu", "replay", str(mine)], ["lrate=0.4"], notices=notes)
    assert cfg.lrate == 0.4 and cfg.memory_size == 300
    assert any("memory_size=300" in n and "mednist_cpu: 200" in n for n in notes), notes
    rec = protocol_record(cfg)
    assert rec["departs"] == {"memory_size": {"protocol": 200, "run": 300}}
    assert rec["hash"] != protocol_record(load_config(["mednist_cpu", "replay"]))["hash"]


def test_running_some_of_the_protocol_seeds_keeps_the_protocol():
    notes: list = []
    a = load_config(["mednist_cpu", "replay"], ["seed=1994"], notices=notes)
    assert not notes
    assert protocol_record(a)["hash"] == protocol_record(load_config(["mednist_cpu", "replay"]))["hash"]


def test_a_protocol_file_with_a_method_key_is_refused(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("protocol: mine\ndataset: digits\nlrate: 0.1\n")
    with pytest.raises(UserError, match="sets 'lrate', not a protocol key; a protocol holds only"):
        load_config([str(bad), "replay"])


def test_a_users_protocol_file_works_by_path(tmp_path):
    mine = tmp_path / "p.yaml"
    mine.write_text("protocol: tiny\ndataset: digits\nbackbone: resnet20\nimg_size: 8\nmemory_size: 40\n")
    cfg = load_config([str(mine), "replay"])
    assert cfg.protocol == "tiny" and cfg.backbone == "resnet20"
    assert protocol_record(cfg)["departs"] == {}  # no shipped protocol of that name to depart from


def test_two_protocols_a_protocol_without_method_and_an_unknown_name_are_one_line_errors():
    with pytest.raises(UserError, match="two protocols"):
        load_config(["digits", "mednist_cpu", "replay"])
    with pytest.raises(UserError, match="names no method"):
        load_config(["mednist_cpu"])
    with pytest.raises(UserError, match="no such file, protocol or method.*did you mean 'mednist_cpu'"):
        load_config(["mednist_cpux"])


def test_no_config_is_the_embedded_default_dynammo_on_digits():
    cfg = load_config()
    assert (cfg.protocol, cfg.method, cfg.dataset) == ("digits", "dynammo", "digits")
    assert load_config(None, ["method=replay"]).lrate == read_yaml(shipped_method_file("replay", "digits"))["lrate"]


def test_a_flat_config_file_still_works(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("method: finetune\ndataset: digits\nepochs: 3\n")
    cfg = load_config(str(flat))
    assert cfg.method == "finetune" and cfg.epochs == 3 and cfg.protocol is None


def test_dynammo_list_shows_the_protocols(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert f"  {name} " in out
    assert "mean class recall" in out  # skin8_acl's headline metric is said


def test_skin8_protocol_reports_mcr():
    assert load_config(["skin8_acl", "acl"]).metric == "mcr"


@pytest.mark.parametrize("name,missing", [("path16_acl", "PATH16 not found under"),
                                          ("skin8_acl", "SKIN8 (ISIC 2019) not found under"),
                                          ("skin40_scratch", "SKIN40 (SD-198) not found under"),
                                          ("cifar100_acl", "CIFAR-100 not found")])
def test_a_protocol_whose_data_is_missing_fails_with_one_line(cli, tmp_path, name, missing):
    r = cli("run", "-c", name, "-c", "acl", "--out", tmp_path / "r", f"data_root={tmp_path / 'nodata'}",
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_a_run_records_protocol_deviations_and_budget(run_in_process, tmp_path, single_thread):
    out = tmp_path / "run"
    assert run_in_process("run", "-c", "digits", "-c", "acl", "--out", out, "backbone=resnet20", "img_size=8",
                          "epochs=1", "epochs_finetune=1", "backbone_epochs=1", "max_train_per_class=8",
                          "increment=4", "init_cls=6", "progress=false", "plots=false", "tensorboard=false") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["name"] == "digits"
    assert set(res["protocol"]["departs"]) == {"backbone", "img_size", "epochs", "max_train_per_class",
                                                "increment", "init_cls"}
    assert any("backbone trained on task 1's data for 1 epochs, then frozen" in d for d in res["deviations"])
    # task 1: backbone + adapters; task 2: adapters + heads; images = epochs x set size
    assert [[s["stage"] for s in t] for t in res["budget"]] == [["backbone", "adapters"], ["adapters", "heads"]]
    assert res["budget"][0][0]["images"] == 6 * 8
    assert res["cost"][0]["train_images"] == sum(s["images"] for s in res["budget"][0])
    log = (out / "log.txt").read_text()
    assert "acl: protocol digits #" + res["protocol"]["hash"] in log and "deviation: backbone trained" in log
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["protocol"] == "digits"


def test_medmnist4_builds_one_task_per_dataset_in_order(tmp_path, write_npz, single_thread):
    """The reference framework's MedMNIST stream: BloodMNIST 8, OrganAMNIST 11, PathMNIST 9,
    TissueMNIST 8 classes, one task each, in that order."""
    from dynammo.data import load_data
    from dynammo.data.scenario import Scenario

    for flag, n, rgb in (("bloodmnist", 8, True), ("organamnist", 11, False), ("pathmnist", 9, True),
                         ("tissuemnist", 8, False)):
        write_npz(tmp_path / f"{flag}.npz", n, per_class=(1, 1, 1), rgb=rgb)
    cfg = load_config(["medmnist4", "finetune"], [f"data_root={tmp_path}", "img_size=28", "pretrained=false",
                                                 "download=false"])
    data = load_data(cfg, 50)
    sc = Scenario.from_config(data, cfg, 50)
    assert [t.size for t in sc] == [8, 11, 9, 8]
    assert [{data.class_names[c].split("/")[0] for c in task} for task in sc.classes_of_tasks()] == \
        [{"bloodmnist"}, {"organamnist"}, {"pathmnist"}, {"tissuemnist"}]
    assert data.train.channels == 3 and len(data.train) == 36 and len(data.test) == 36
