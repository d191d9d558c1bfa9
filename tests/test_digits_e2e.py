"""End to end on the digits protocol (the embedded default: `dynammo run` with no config), with
results that a wrong method would not give: Replay keeps the old classes Finetune loses, Joint is
the upper bound, DynaMMo's inference cost stays at task 1's while ACL's grows by one path per task.

Size: the protocol's data, split (5 tasks x 2 classes), class order, image size (16 px) and memory
(100), with a CIFAR ResNet-20 instead of the protocol's ResNet-18 and 3 epochs per task (about 1 s
per task on one thread; measured on seeds 1993, 1 and 2, Replay's last accuracy was 38-50 against
Finetune's 10-11, and Joint's 93-94)."""
from __future__ import annotations

import json

import pytest

from dynammo.models.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = ["backbone=resnet20", "progress=false", "plots=false", "tensorboard=false", "save_checkpoints=false"]


def run(run_in_process, out, *args) -> dict:
    assert run_in_process("run", "--out", out, *SMALL, *args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def baselines(run_in_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return {m: run(run_in_process, root / m, f"method={m}", "epochs=3") for m in ("finetune", "replay", "joint")}


def old_tasks_after_the_last(r) -> float:
    """Mean accuracy on the classes of every task but the last, after the last task."""
    row = r["acc_matrix"][-1]
    return sum(row[:-1]) / (len(row) - 1)


def test_runs_follow_the_digits_protocol(baselines):
    for name, r in baselines.items():
        assert (r["method"], r["dataset"], r["status"], r["seed"]) == (name, "digits", "complete", 1993)
        assert [len(t) for t in r["tasks"]] == [2] * 5
        assert r["protocol"]["name"] == "digits"
        assert set(r["protocol"]["departs"]) == {"backbone", "epochs"}  # the rest is the protocol's
    assert baselines["finetune"]["class_order"] == baselines["replay"]["class_order"] == baselines["joint"]["class_order"]
    assert [c["memory_exemplars"] for c in baselines["replay"]["cost"]] == [100, 100, 96, 96, 100]
    assert all(c["memory_exemplars"] == 0 for n in ("finetune", "joint") for c in baselines[n]["cost"])


def test_replay_keeps_the_old_classes_that_finetune_loses(baselines):
    ft, rp = baselines["finetune"], baselines["replay"]
    assert old_tasks_after_the_last(ft) < 5  # no memory: the old classes are gone
    assert old_tasks_after_the_last(rp) >= old_tasks_after_the_last(ft) + 15
    assert rp["last_acc"] >= ft["last_acc"] + 15
    assert rp["avg_acc"] >= ft["avg_acc"] + 10


def test_joint_is_the_upper_bound(baselines):
    joint = baselines["joint"]
    assert joint["last_acc"] >= 80
    assert joint["last_acc"] >= max(baselines["finetune"]["last_acc"], baselines["replay"]["last_acc"]) + 10
    assert joint["forgetting"] < 15  # every task's model is trained on every class seen


@pytest.fixture(scope="module")
def adapter_runs(run_in_process, tmp_path_factory):
    """DynaMMo as the embedded default (no config, no method), and ACL on the same keys; one epoch
    per stage: the cost does not depend on the training."""
    root = tmp_path_factory.mktemp("adapters")
    tiny = ["epochs=1", "backbone_epochs=1", "epochs_finetune=1", "max_train_per_class=20"]
    return {"dynammo": run(run_in_process, root / "dynammo", *tiny),
            "acl": run(run_in_process, root / "acl", "method=acl", *tiny)}


def test_no_config_runs_the_embedded_dynammo_default(adapter_runs):
    r = adapter_runs["dynammo"]
    assert (r["method"], r["dataset"], r["status"]) == ("dynammo", "digits", "complete")
    assert len(r["tasks"]) == 5 and len(r["task_id_acc"]) == 5


def test_dynammo_inference_cost_stays_at_task_1s_while_acls_grows(adapter_runs):
    dyn = [c["inference_gflops"] for c in adapter_runs["dynammo"]["cost"]]
    acl = [c["inference_gflops"] for c in adapter_runs["acl"]["cost"]]
    d = build_backbone("resnet20").out_dim
    head = 2 * d * (2 + 1) / 1e9  # one task head: d -> 2 classes + "others"
    assert acl[0] == dyn[0]  # one task: the same model
    # DynaMMo: ONE pass through the merged adapters after every task; only the heads are added
    for t, g in enumerate(dyn):
        assert g == pytest.approx(dyn[0] + t * head, abs=1e-12), t
    # ACL: one more adapter path (backbone body + adapters) per task, the same every time
    step = acl[1] - acl[0]
    assert step > 0.5 * acl[0]
    for t, g in enumerate(acl):
        assert g == pytest.approx(acl[0] + t * step, abs=1e-12), t
    assert acl[-1] > 4 * dyn[-1]
