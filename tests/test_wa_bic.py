"""WA's weight aligning and clipping, its presets and teacher; BiC's class-balanced split and bias layer;
and end-to-end runs of iCaRL, WA and BiC through the `dynammo` command (the shared distillation and
iCaRL: tests/test_icarl_wa_bic.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dynammo.methods import METHODS
from dynammo.methods.bic import BiasLayer
from dynammo.methods.distill import frozen_copy, kd_loss
from dynammo.methods.wa import align_weights
from method_helpers import make_method, run_task, snapshot
from test_icarl_wa_bic import batch_of, reloaded

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DYNAMMO_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------- WA


def test_align_weights_by_hand():
    torch.manual_seed(0)
    w = torch.rand(7, 5) * torch.tensor([1.0] * 4 + [3.0] * 3).unsqueeze(1)  # new rows 3x larger
    old_rows = w[:4].clone()
    gamma = align_weights(w, 4)
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms[4:].mean(), norms[:4].mean())
    assert torch.equal(w[:4], old_rows)  # old weights bit-for-bit unchanged
    assert 0.2 < gamma < 0.5


def test_wa_aligns_after_each_task_and_clips_weights():
    m = make_method("wa")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    assert (m.net.head.fc.weight >= 0).all()  # clipped from the first task on
    seen = {}
    orig = m.engine.fit

    def spy(*args, **kw):
        out = orig(*args, **kw)
        seen["before_align"] = m.net.head.fc.weight.detach().clone()
        return out

    m.engine.fit = spy
    run_task(m, t1)
    w = m.net.head.fc.weight.detach()
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms[t0.size:].mean(), norms[: t0.size].mean())
    assert torch.equal(w[: t0.size], seen["before_align"][: t0.size])  # old rows untouched by aligning
    before = seen["before_align"].norm(dim=1)
    assert not torch.allclose(before[t0.size:].mean(), before[: t0.size].mean())  # it did change something
    assert (w >= 0).all()
    unclipped = make_method("wa", weight_clipping=False)
    run_task(unclipped, t0)
    assert (unclipped.net.head.fc.weight < 0).any()


def wa_loss_parts(m, t0, t1):
    """WA's loss on a task-2 batch, with its CE and KD terms computed by hand and lambda = n_old / n_seen."""
    m.begin_task(t1)
    batch = batch_of(m, m.training_set(t1), 16)
    loss, logits, _ = m.step(batch)
    with torch.no_grad():
        ce, kd = F.cross_entropy(logits, batch.y), kd_loss(logits, m.old_net(batch.x), 2.0)
    return loss, ce, kd, t0.size / t1.end


@pytest.mark.parametrize("preset,overrides,recipe", [
    ("paper", {}, {"kd_weight": "adaptive", "weight_clipping": True}),  # Zhao et al. 2020
    ("reference", {}, {"kd_weight": "sum", "weight_clipping": False}),  # CL_Pytorch
    ("paper", {"weight_clipping": False}, {"kd_weight": "adaptive", "weight_clipping": False}),  # a key overrides
    ("reference", {"kd_weight": "adaptive"}, {"kd_weight": "adaptive", "weight_clipping": False}),
])
def test_wa_presets_resolve_the_ce_kd_weights_and_the_clipping(preset, overrides, recipe):
    m = make_method("wa", wa_preset=preset, **overrides)
    assert m.recipe == recipe
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    assert bool((m.net.head.fc.weight >= 0).all()) == recipe["weight_clipping"]
    assert (m.net.head.fc.bias < 0).any()  # only the weights are clipped, never the bias
    loss, ce, kd, lam = wa_loss_parts(m, t0, t1)
    want = (1 - lam) * ce + lam * kd if recipe["kd_weight"] == "adaptive" else ce + kd
    torch.testing.assert_close(loss, want)


def test_wa_default_is_the_papers_adaptive_loss_not_ce_plus_kd():
    """The old default mixed CL_Pytorch's CE + KD with the paper's clipping; the default is now the paper's."""
    m = make_method("wa")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    loss, ce, kd, lam = wa_loss_parts(m, t0, t1)
    torch.testing.assert_close(loss, (1 - lam) * ce + lam * kd)
    assert not torch.allclose(loss, ce + kd)


def test_wa_new_rows_start_as_the_reference_frameworks_not_nn_linear():
    """PyCIL's and CL_Pytorch's head: kaiming-uniform with the linear gain (row norm ~1), zero bias. nn.Linear's
    default rows are ~0.58x as long; after a short budget the new rows then stay shorter than the old ones, gamma
    goes well above 1 and the alignment hands the old classes to the new ones (MedNIST 3x2, ResNet-32)."""
    m = make_method("wa")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    old_w, old_b = m.net.head.fc.weight.detach().clone(), m.net.head.fc.bias.detach().clone()
    m.begin_task(t1)
    fc, d = m.net.head.fc, m.net.head.fc.in_features
    assert torch.equal(fc.weight[: t0.size], old_w) and torch.equal(fc.bias[: t0.size], old_b)
    new = fc.weight[t0.size:].detach()
    bound = (3.0 / d) ** 0.5
    assert new.abs().max() <= bound and new.abs().max() > 0.9 * bound  # U(-sqrt(3/d), sqrt(3/d)), not 1/sqrt(d)
    assert torch.equal(fc.bias[t0.size:], torch.zeros(t1.size))
    torch_init = make_method("wa", fc_init="torch")
    torch_init.begin_task(t0)
    assert torch_init.net.head.fc.weight.abs().max() <= d ** -0.5 and (torch_init.net.head.fc.bias != 0).all()
    assert any("fc_init=torch" in line for line in METHODS.get("wa").deviations(torch_init.cfg))


def test_wa_teacher_is_the_aligned_network_of_the_previous_task():
    m = make_method("wa", wa_preset="reference")
    t0, t1, t2 = m.scenario.tasks[:3]
    run_task(m, t0)
    run_task(m, t1)  # aligned at the end of its training
    aligned = m.net.head.fc.weight.detach().clone()
    m.begin_task(t2)
    assert torch.equal(m.old_net.head.fc.weight, aligned)


def test_wa_deviations_name_the_preset_and_each_override():
    from dynammo.configure import build_config

    wa = METHODS.get("wa")
    cfg = lambda **kw: build_config({"method": "wa", "dataset": "digits", **kw})  # noqa: E731
    assert wa.deviations(cfg()) == [] and wa.label(cfg()) == "wa"
    assert wa.deviations(cfg(kd_weight="adaptive", weight_clipping=True)) == []  # the paper's values, spelt out
    ref = wa.deviations(cfg(wa_preset="reference"))
    assert len(ref) == 1 and "reference preset" in ref[0] and "CL_Pytorch" in ref[0] and "no weight clipping" in ref[0]
    assert wa.label(cfg(wa_preset="reference")) == "wa [wa_preset=reference]"
    no_clip = wa.deviations(cfg(weight_clipping=False))
    assert len(no_clip) == 1 and "without weight clipping" in no_clip[0] and "weight_clipping=False" in no_clip[0]
    summed = wa.deviations(cfg(kd_weight="sum"))
    assert len(summed) == 1 and "CE + KD (sum; kd_weight=sum)" in summed[0]
    # the reference preset with the paper's loss departs from the paper in the clipping only
    mixed = wa.deviations(cfg(wa_preset="reference", kd_weight="adaptive"))
    assert len(mixed) == 1 and "wa_preset=reference" in mixed[0] and "clipping" in mixed[0]
    assert wa.label(cfg(wa_preset="reference", kd_weight="adaptive")) == "wa [wa_preset=reference, kd_weight=adaptive]"


# ---------------------------------------------------------------- BiC


def test_bias_layer_changes_only_the_new_classes_logits():
    layer = BiasLayer(4, 7)
    with torch.no_grad():
        layer.alpha.fill_(1.7), layer.beta.fill_(-0.3)
    z = torch.randn(6, 10)
    out = layer(z)
    assert torch.equal(out[:, :4], z[:, :4]) and torch.equal(out[:, 7:], z[:, 7:])  # bit-identical
    torch.testing.assert_close(out[:, 4:7], 1.7 * z[:, 4:7] - 0.3)
    identity = BiasLayer(4, 7)(z)  # alpha 1, beta 0 at the start
    assert torch.equal(identity, z)


def test_bic_split_is_class_balanced_and_held_out():
    m = make_method("bic", split_ratio=0.2, max_train_per_class=20, memory_size=40)
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    train, val = m.split(t1)
    n_val = int(0.2 * m.memory.quota(t0.end))  # 0.2 * (40 // 4) = 2 per class
    assert n_val == 2
    assert torch.bincount(val.labels, minlength=t1.end).tolist() == [n_val] * t1.end
    memory = m.memory.as_imageset()
    new = m.scenario.train_data(t1)
    assert len(train) + len(val) == len(memory) + len(new)
    key = lambda s: {(int(y), bytes(img.numpy())) for y, img in zip(s.labels, s.images)}  # noqa: E731
    assert not key(train) & key(val) and key(train) | key(val) == key(memory) | key(new)
    assert m.lamda() == pytest.approx(t0.size / t1.end)


def test_bic_stage2_trains_only_the_new_bias_layer_and_leaves_old_logits_bit_identical():
    m = make_method("bic", lrate=0.05)
    t0, t1, t2 = m.scenario.tasks
    run_task(m, t0)
    assert len(m.net.bias_layers) == 0
    seen = {}
    orig = m.train_bias

    def spy(val):
        seen["net"] = snapshot(m.net)
        orig(val)

    m.train_bias = spy
    run_task(m, t1)
    after = snapshot(m.net)
    changed = {k for k in after if not torch.equal(after[k], seen["net"][k])}
    assert changed == {"bias_layers.0.alpha", "bias_layers.0.beta"}  # BN statistics too: eval mode
    layer = m.net.bias_layers[0]
    assert (layer.start, layer.end) == (t1.start, t1.end)
    assert layer.alpha.item() != 1.0 and layer.beta.item() != 0.0  # alpha and beta did train
    run_task(m, t2)
    assert len(m.net.bias_layers) == 2 and not any(p.requires_grad for p in m.net.bias_layers.parameters())
    m.eval_mode()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        raw = m.net.raw_logits(x)
        out = m.net(x)
        without_last = m.net.bias_layers[0](raw)
    torch.testing.assert_close(out, m.net.bias_layers[1](without_last))
    assert torch.equal(out[:, : t2.start], without_last[:, : t2.start])  # the last layer leaves old logits alone
    assert torch.equal(out[:, : t1.start], raw[:, : t1.start])  # task 0's logits are never corrected
    assert not torch.equal(out[:, t2.start:], raw[:, t2.start:])
    # the teacher of a next task holds the bias layers, and so does a checkpoint
    other = reloaded(m)
    assert len(other.net.bias_layers) == 2
    with torch.no_grad():
        assert torch.equal(other.predict(x)["logits"], m.predict(x)["logits"])
    assert len(frozen_copy(m.net).bias_layers) == 2


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e_runs(tiny_run):
    """The shared tiny runs (conftest `tiny_run`), which tests/test_method_contract.py also checks
    (reload, batch-size independence, export, cost, resume, reproducibility)."""
    return {name: tiny_run(name) for name in ("icarl", "wa", "bic")}


def test_end_to_end_results_json(e2e_runs):
    for name, run_dir in e2e_runs.items():
        r = json.loads((run_dir / "results.json").read_text())
        assert r["status"] == "complete" and r["method"] == name and len(r["acc"]) == 3
        assert all(c["memory_exemplars"] > 0 for c in r["cost"])
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["T"] == 2.0
    icarl = json.loads((e2e_runs["icarl"] / "results.json").read_text())
    cnn = icarl["extra"]["cnn"]  # NME is the headline; the CNN head beside it, with every metric
    assert len(cnn["acc"]) == 3 and cnn["last_acc"] == cnn["acc"][-1] and cnn["acc"] != icarl["acc"]
    assert cnn["forgetting"] is not None and len(cnn["mcr"]) == 3 and len(cnn["acc_matrix"]) == 3
    assert "extra" not in json.loads((e2e_runs["wa"] / "results.json").read_text())
    assert "weight aligning: gamma" in (e2e_runs["wa"] / "log.txt").read_text()
    log = (e2e_runs["bic"] / "log.txt").read_text()
    assert "bias layer: alpha" in log and "bias epoch" in log
    bic_p = [c["params_total"] for c in json.loads((e2e_runs["bic"] / "results.json").read_text())["cost"]]
    wa_p = [c["params_total"] for c in json.loads((e2e_runs["wa"] / "results.json").read_text())["cost"]]
    assert [b - w for b, w in zip(bic_p, wa_p)] == [0, 2, 4]  # + alpha, beta per task t >= 1


needs_mednist = pytest.mark.skipif(not (SHARED / "mednist.tar.gz").is_file(),
                                   reason=f"real MedNIST not found at {SHARED} (the ../shared/data folder)")


@needs_mednist
@pytest.mark.parametrize("name", ["icarl", "wa", "bic"])
def test_cpu_config_on_real_mednist(cli, tmp_path, name):
    out = tmp_path / name
    proc = cli("run", "-c", "mednist_cpu", "-c", name, "--out", str(out), "seed=1993",
               f"data_root={SHARED}", "epochs=1", "max_train_per_class=30", "max_test_per_class=30",
               "img_size=32", "memory_size=30", "progress=false", "plots=false", "tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["dataset"] == "mednist" and len(r["acc"]) == 3
    assert r["cost"][-1]["memory_exemplars"] == 30
    if name == "icarl":
        assert len(r["extra"]["cnn"]["acc"]) == 3
