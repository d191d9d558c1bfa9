"""ACL and DynaMMo: their options (head initialisation, BatchNorm re-estimation after merging, the
herding space, config checks) and end-to-end runs of the `dynammo` command (stages, merging,
min-others and cost: tests/test_acl_dynammo.py)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from dynammo.data.imageset import ImageSet
from dynammo.data.memory import herding
from dynammo.errors import UserError
from dynammo.models.adapters import AdapterSet

from method_helpers import run_task
from test_acl_dynammo import make_method, randomize_

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- options


def test_head_init_option():
    aux = torch.nn.Linear(64, 4)
    t0, t1 = make_method("dynammo").scenario.tasks[:2]
    for name in ("acl", "dynammo"):
        rnd, from_aux = make_method(name), make_method(name, head_init="auxiliary")
        assert rnd.make_head(t0, aux) is aux and from_aux.make_head(t0, aux) is aux  # task 0: the aux head
        h_rnd, h_aux = rnd.make_head(t1, aux), from_aux.make_head(t1, aux)
        assert torch.equal(h_aux.weight, aux.weight) and torch.equal(h_aux.bias, aux.bias)
        assert h_aux.weight.data_ptr() != aux.weight.data_ptr()  # a copy
        assert not torch.equal(h_rnd.weight, aux.weight)


def test_head_init_auxiliary_in_training():
    """The new head stage 3 starts from: a copy of the aux head (auxiliary) or a random one."""
    picked = {}
    for init in ("random", "auxiliary"):
        m = make_method("dynammo", head_init=init)
        run_task(m, m.scenario.tasks[0])
        orig = m.make_head

        def keep(task, aux, orig=orig, init=init):
            picked[init] = aux.weight.detach().clone()
            head = orig(task, aux)
            picked[init + "_head"] = head.weight.detach().clone()  # before stage 3 trains it
            return head

        m.make_head = keep
        run_task(m, m.scenario.tasks[1])
    assert torch.equal(picked["auxiliary_head"], picked["auxiliary"])
    assert not torch.equal(picked["random_head"], picked["random"])


def test_merge_bn_reestimate_option():
    stats = {}
    for mode in ("average", "reestimate"):
        m = make_method("dynammo", merge_bn=mode)
        t0, t1 = m.scenario.tasks[:2]
        m.grow(t0)
        randomize_(m.net.task_set, 1)
        m.begin_task(t1)
        new = m.net.new_task_adapters()
        randomize_(new, 2)
        new.freeze()
        m.after_adapters(t1)
        bn = m.net.merged.adapters["layer2"].bn2
        stats[mode] = (bn.running_mean.clone(), bn.running_var.clone())
        if mode == "average":
            old = randomize_(AdapterSet(m.net.channels), 1).adapters["layer2"].bn2
            torch.testing.assert_close(bn.running_mean, (old.running_mean + new.adapters["layer2"].bn2.running_mean) / 2)
        else:  # the statistics of the merged BN's input on memory + task data (one evaluation batch)
            data = ImageSet.concat([m.scenario.train_data(t1), m.memory.as_imageset()])
            x = m.engine.test_tf(data.images)
            ref = m.net.merged.copy().train()
            captured = {}
            ref.adapters["layer2"].bn2.register_forward_pre_hook(lambda mod, i: captured.__setitem__("x", i[0]))
            with torch.no_grad():
                m.net.backbone(x, stage_hook=ref.hook)
            torch.testing.assert_close(bn.running_mean, captured["x"].mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(bn.running_var, captured["x"].var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
            assert not bn.training and bn.momentum == 0.1
    assert not torch.allclose(stats["average"][0], stats["reestimate"][0])


def test_herding_space_option():
    chosen = {}
    for space in ("task", "merged"):
        m = make_method("dynammo", herding_space=space, max_train_per_class=20, memory_size=100)
        for task in m.scenario.tasks[:2]:
            run_task(m, task)
        net = m.net
        cls = m.scenario.tasks[1].classes[0]
        data = m.scenario.train.of_classes([cls])
        per_class = m.memory.quota(m.scenario.tasks[1].end)
        feats = {s: m.engine.apply(lambda x, a=a: net.encode(x, a), data)
                 for s, a in (("task", net.task_set), ("merged", net.merged))}
        idx = {s: herding(f, per_class) for s, f in feats.items()}
        assert not torch.equal(idx["task"], idx["merged"])  # the two spaces disagree here ...
        kept = m.memory.per_class[cls].images
        assert torch.equal(kept, data.images[idx[space]])  # ... and the memory follows the option
        chosen[space] = kept
    assert not torch.equal(chosen["task"], chosen["merged"])


def test_config_checks():
    with pytest.raises(UserError, match="layer_names"):
        make_method("acl", layer_names=["layer7"])
    with pytest.raises(UserError, match="img_size"):
        make_method("dynammo", backbone="resnet18_cifar", img_size=8)  # layer4's input would be 1x1
    m = make_method("dynammo", backbone="resnet18_cifar", img_size=8, layer_names=["layer1", "layer2"])
    assert list(m.net.channels) == ["layer1", "layer2"]
    with pytest.raises(UserError, match="merge_bn"):
        make_method("dynammo", merge_bn="median")
    with pytest.raises(UserError, match="belongs to"):
        make_method("acl", herding_space="merged")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e_runs(tiny_run):
    """The shared tiny runs (conftest `tiny_run`), which tests/test_method_contract.py also checks
    (reload, batch-size independence, export, cost, resume, reproducibility)."""
    return {name: tiny_run(name) for name in ("acl", "dynammo")}


def test_end_to_end_results_json(e2e_runs):
    res = {n: json.loads((d / "results.json").read_text()) for n, d in e2e_runs.items()}
    for name, r in res.items():
        assert r["status"] == "complete" and r["method"] == name
        assert len(r["acc"]) == 3 and len(r["acc_matrix"]) == 3 and len(r["cost"]) == 3
        assert len(r["task_id_acc"]) == 3
        assert r["task_id_acc"][0] == 100.0  # one task: always right
        # min-others: a sample is right only if its task is (task-id) and its class within the task
        # is (task-IL), so neither can be below the class-IL accuracy
        for acc, task_id, til in zip(r["acc"], r["task_id_acc"], r["task_il_acc"]):
            assert acc <= task_id and acc <= til
        assert r["avg_acc"] is not None and r["forgetting"] is not None and len(r["task_il_acc"]) == 3
        assert all(c["memory_exemplars"] > 0 and c["params_trainable"] > 0 for c in r["cost"])
    acl_g = [c["inference_gflops"] for c in res["acl"]["cost"]]
    dyn_g = [c["inference_gflops"] for c in res["dynammo"]["cost"]]
    assert acl_g[0] < acl_g[1] < acl_g[2] and acl_g[2] > 2.5 * acl_g[0]
    assert max(dyn_g) <= min(dyn_g) * 1.01
    acl_p = [c["params_total"] for c in res["acl"]["cost"]]
    dyn_p = [c["params_total"] for c in res["dynammo"]["cost"]]
    assert acl_p[0] == dyn_p[0] and acl_p[2] - acl_p[1] > 10 * (dyn_p[2] - dyn_p[1])  # DynaMMo: + a head only
    log = (e2e_runs["dynammo"] / "log.txt").read_text()
    assert "task-id" in log and "pretrained=false" in log
    cfg = yaml.safe_load((e2e_runs["dynammo"] / "config.yaml").read_text())
    assert cfg["merge_bn"] == "average" and cfg["herding_space"] == "task" and cfg["head_init"] == "random"
