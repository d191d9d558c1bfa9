"""PODNet: the local similarity classifier, the NCA loss, the pooled outputs distillation, the
balanced fine-tuning stage, reload, and a CLI run."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dynammo.configure import build_config
from dynammo.methods import METHODS
from dynammo.methods.podnet import nca_loss, pod_factor, pod_flat_loss, pod_pool, pod_spatial_loss
from dynammo.models.cosine import CosineClassifier, aggregate_proxies, imprinted_weights

import method_helpers
from method_helpers import run_task, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(method_helpers.TINY, proxies=3, epochs_finetune=1)


def make_method(**kw):
    return method_helpers.make_method("podnet", TINY, **kw)


def test_registered_with_alias_and_paper_defaults():
    assert METHODS.canonical("podnet_il") == "podnet"
    opts = METHODS.get("podnet").options
    assert opts["proxies"].default == 10 and opts["nca_margin"].default == 0.6
    assert opts["lambda_spatial"].default == 3.0 and opts["lambda_flat"].default == 1.0
    assert opts["epochs_finetune"].default == 20 and opts["lrate_finetune"].default == 0.05


def test_lsc_with_one_proxy_is_a_plain_cosine_classifier():
    torch.manual_seed(0)
    lsc = CosineClassifier(in_dim=5, proxies=1, scale=2.5)
    lsc.expand(3)
    lsc.expand(2)
    f = torch.randn(4, 5)
    w = lsc.weights()
    plain = 2.5 * (F.normalize(f, dim=1) @ F.normalize(w, dim=1).T)
    torch.testing.assert_close(lsc(f), plain)


def test_lsc_weights_each_class_proxies_by_their_softmax():
    sims = torch.tensor([[0.2, 0.8, -0.5, 0.1]])  # 2 classes x 2 proxies, class-major
    a = math.exp(0.2) / (math.exp(0.2) + math.exp(0.8))
    b = math.exp(-0.5) / (math.exp(-0.5) + math.exp(0.1))
    want = torch.tensor([[a * 0.2 + (1 - a) * 0.8, b * -0.5 + (1 - b) * 0.1]])
    torch.testing.assert_close(aggregate_proxies(sims, 2), want)
    torch.manual_seed(0)
    lsc = CosineClassifier(in_dim=4, proxies=2)
    lsc.expand(3)
    f = torch.randn(5, 4)
    proxy_cos = F.normalize(f, dim=1) @ F.normalize(lsc.weights(), dim=1).T
    torch.testing.assert_close(lsc.similarities(f), aggregate_proxies(proxy_cos, 2))
    assert lsc.num_classes == 3 and lsc(f).shape == (5, 3)


def test_nca_loss_on_hand_made_similarities():
    s = torch.tensor([[0.9, 0.1, -0.2],   # y=0
                      [0.5, 0.4, 0.0],    # y=1
                      [0.0, 0.0, 0.95]])  # y=2: well beyond the margin -> hinge gives 0
    y = torch.tensor([0, 1, 2])
    eta, delta = 2.0, 0.6
    per = [math.log(math.exp(eta * 0.1) + math.exp(eta * -0.2)) - eta * (0.9 - delta),
           math.log(math.exp(eta * 0.5) + math.exp(eta * 0.0)) - eta * (0.4 - delta),
           math.log(math.exp(0.0) + math.exp(0.0)) - eta * (0.95 - delta)]
    want = sum(max(0.0, v) for v in per) / 3
    assert per[2] < 0  # the hinge matters for this sample
    assert nca_loss(s, y, torch.tensor(eta), delta).item() == pytest.approx(want, rel=1e-6)


def test_nca_scale_gradient_ignores_the_margin_term_in_the_stable_variant():
    s = torch.tensor([[0.3, 0.1]])  # margin not met: the paper's eta gradient would push eta down
    eta = torch.tensor(1.0, requires_grad=True)
    nca_loss(s, torch.tensor([0]), eta, 0.6, "stable").backward()
    assert eta.grad.item() == pytest.approx(0.1 - 0.3)  # d/deta [eta * 0.1 - eta * 0.3]: eta grows


def test_nca_paper_variant_is_eq_7_with_its_full_gradient_and_the_default():
    s = torch.tensor([[0.3, 0.1]])
    eta = torch.tensor(1.0, requires_grad=True)
    loss = nca_loss(s, torch.tensor([0]), eta, 0.6)
    assert loss.item() == pytest.approx(0.1 - (0.3 - 0.6))  # log exp(eta 0.1) - eta (0.3 - 0.6)
    loss.backward()
    assert eta.grad.item() == pytest.approx(0.1 - 0.3 + 0.6)  # the margin term pushes eta down
    cfg = build_config({"method": "podnet"})
    assert cfg.nca_variant == "paper" and not any("NCA" in d for d in METHODS.get("podnet").deviations(cfg))
    stable = build_config({"method": "podnet", "nca_variant": "stable"})
    assert METHODS.get("podnet").label(stable) == "podnet [nca_variant=stable]"
    assert any(d.startswith("nca_variant=stable instead of the paper's paper") for d in
               METHODS.get("podnet").deviations(stable))


def test_nca_code_variant_is_the_released_loss():
    s = torch.tensor([[0.9, 0.1, -0.2], [0.5, 0.4, 0.0]])
    y = torch.tensor([0, 1])
    eta, delta = 2.0, 0.6
    want = []
    for row, t in zip(s.tolist(), y.tolist()):
        z = [eta * (v - delta) for v in row]  # the margin subtracted from every similarity
        z = [v - max(z) for v in z]
        denominator = sum(math.exp(0.0 if c == t else v) for c, v in enumerate(z))  # target slot: exp(0)
        want.append(-(z[t] - math.log(denominator)))  # no hinge
    got = nca_loss(s, y, torch.tensor(eta), delta, "code")
    assert got.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    # the margin cancels: the same loss for any margin
    assert nca_loss(s, y, torch.tensor(eta), 0.0, "code").item() == pytest.approx(got.item(), rel=1e-6)


def test_pod_spatial_pools_width_and_height_by_hand():
    h = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])  # (1, 1, 2, 2); squared: [[1, 4], [0, 1]]
    raw = torch.tensor([5.0, 1.0, 1.0, 5.0])  # sums over width (rows: 5, 1), then over height (cols: 1, 5)
    torch.testing.assert_close(pod_pool(h), (raw / raw.norm()).unsqueeze(0))
    g = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # pooled [1, 1, 1, 1] / 2
    want = (raw / raw.norm() - torch.full((4,), 0.5)).norm()
    torch.testing.assert_close(pod_spatial_loss([g], [h]), want)
    assert pod_factor(10, 2) == pytest.approx(math.sqrt(5))


def test_distillation_is_zero_between_identical_models_and_positive_otherwise():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    m.old_backbone = copy.deepcopy(m.net.backbone).eval()
    m.net.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        feats, stages = m.net.backbone(x, return_stages=True)
        assert len(stages) == len(m.net.backbone.stage_names) == 3
        assert m.distillation(x, feats, stages).abs().item() < 1e-5
        m.net.backbone.layer2[0].conv1.weight.mul_(-1.0)  # a change in a middle stage
        feats, stages = m.net.backbone(x, return_stages=True)
        total = m.distillation(x, feats, stages)
        old_feats, old_stages = m.old_backbone(x, return_stages=True)
    spatial, flat = pod_spatial_loss(old_stages, stages), pod_flat_loss(old_feats, feats)
    assert spatial.item() > 1e-3 and flat.item() > 1e-4
    torch.testing.assert_close(total, math.sqrt(7 / 3) * (3.0 * spatial + 1.0 * flat))


def test_imprinted_proxies_are_normalised_kmeans_centres():
    torch.manual_seed(0)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(20, 3)
    b = torch.tensor([0.0, 1.0, 0.0]) + 0.01 * torch.randn(20, 3)
    w = imprinted_weights([torch.cat([a, b])], proxies=2, norm=2.0)
    assert w.shape == (2, 3)
    torch.testing.assert_close(w.norm(dim=1), torch.full((2,), 2.0))
    got = sorted(F.normalize(w, dim=1).argmax(dim=1).tolist())
    assert got == [0, 1]  # one proxy per cluster


def test_balanced_finetuning_trains_only_the_proxies():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    old_block = m.net.head.blocks[0].detach().clone()
    m.old_backbone = None
    m.train_mode()
    backbone_before = snapshot(m.net.backbone)
    scale_before = m.net.head.scale.detach().clone()
    head_before = [b.detach().clone() for b in m.net.head.blocks]
    m.balanced_finetune(t1)
    after = snapshot(m.net.backbone)
    assert all(torch.equal(backbone_before[k], after[k]) for k in after)  # weights and BN statistics
    assert torch.equal(m.net.head.scale, scale_before)
    assert not torch.equal(m.net.head.blocks[0], head_before[0])  # old proxies move in this stage
    assert not torch.equal(m.net.head.blocks[1], head_before[1])
    assert torch.equal(head_before[0], old_block)


def test_main_stage_keeps_old_proxies_and_runs_finetuning():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    old_block = m.net.head.blocks[0].detach().clone()
    stages = []
    original = m.engine.fit

    def spy(params, data, loss, settings, stage="train", **kw):
        stages.append((stage, len(data)))
        if stage == "train":
            out = original(params, data, loss, settings, stage=stage, **kw)
            assert torch.equal(m.net.head.blocks[0], old_block)  # frozen during the main stage
            return out
        return original(params, data, loss, settings, stage=stage, **kw)

    m.engine.fit = spy
    m.train_task(t1)
    m.engine.fit = original
    m_per_class = m.memory.quota(t1.end)
    assert [s for s, _ in stages] == ["train", "balanced"]
    assert stages[1][1] == m_per_class * t1.end  # m exemplars of every seen class


def test_state_dict_reloads_into_identical_predictions():
    m = make_method()
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    m.eval_mode()
    x = m.engine.test_tf(m.scenario.test.get(torch.arange(10)))
    with torch.no_grad():
        before = m.predict(x)["logits"]
    fresh = make_method()
    fresh.load_state_dict(m.state_dict())
    fresh.eval_mode()
    with torch.no_grad():
        after = fresh.predict(x)["logits"]
    assert torch.equal(before, after) and after.shape == (10, 7)


def test_cli_run_on_digits_writes_results(tiny_run):
    """The shared tiny run (conftest `tiny_run`; tests/test_method_contract.py checks its reload,
    export, cost, resume and reproducibility)."""
    out = tiny_run("podnet")
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["method"] == "podnet"
    assert len(r["acc"]) == 3 and r["forgetting"] is not None
    # the prediction is the argmax of the LSC logits: right over all seen classes implies right
    # within the sample's task, and with one task both are the same number
    assert r["acc"][0] == r["task_il_acc"][0]
    assert all(a <= t for a, t in zip(r["acc"], r["task_il_acc"]))
    assert all(c["memory_exemplars"] > 0 and c["params_trainable"] > 0 for c in r["cost"])
    log = (out / "log.txt").read_text()
    assert "balanced epoch 1/1" in log and log.count("balanced epoch") == 2  # tasks 2 and 3 only
