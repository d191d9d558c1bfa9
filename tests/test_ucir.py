"""UCIR / LUCIR: the cosine classifier, the less-forget constraint, the margin ranking loss, the
backbone without its last ReLU, imprinting and frozen old weights, reload, and a CLI run."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dynammo.methods import METHODS
from dynammo.methods.ucir import less_forget_loss, less_forget_weight, margin_ranking_loss
from dynammo.models.backbones import build_backbone
from dynammo.models.cosine import CosineClassifier

import method_helpers
from method_helpers import run_task

pytestmark = pytest.mark.usefixtures("single_thread")


def make_method(name: str = "ucir", **kw):
    return method_helpers.make_method(name, **kw)


def test_registered_with_aliases_and_paper_defaults():
    for alias in ("ucir", "lucir", "ucir_il"):
        assert METHODS.canonical(alias) == "ucir"
    opts = METHODS.get("ucir").options
    assert opts["lambda_base"].default == 5.0 and opts["mr_k"].default == 2
    assert opts["mr_margin"].default == 0.5 and opts["mr_weight"].default == 1.0
    assert opts["last_relu"].default is False and opts["imprint"].default is True


def test_cosine_classifier_is_sigma_times_cosine_by_hand():
    torch.manual_seed(0)
    head = CosineClassifier(in_dim=3)
    head.expand(2)  # old block
    head.expand(1)  # new block
    with torch.no_grad():
        head.scale.fill_(3.7)
        head.blocks[0].copy_(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
        head.blocks[1].copy_(torch.tensor([[0.0, -2.0, 2.0]]))
    f = torch.tensor([[2.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    want = torch.tensor([[1.0, 1 / math.sqrt(2), 0.0],  # cos of f0 with each weight, by hand
                         [1 / 3, 3 / (3 * math.sqrt(2)), 0.0]])
    torch.testing.assert_close(head.similarities(f), want)
    torch.testing.assert_close(head(f), 3.7 * want)
    assert head.num_classes == 3


def test_less_forget_loss_zero_for_identical_models_positive_otherwise():
    torch.manual_seed(0)
    new = build_backbone("resnet20").eval()
    new.remove_last_relu()
    old = copy.deepcopy(new)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert less_forget_loss(new(x), old(x)).abs().item() < 1e-6
        new.layer3[-1].conv2.weight.add_(0.5 * torch.randn_like(new.layer3[-1].conv2.weight))
        loss = less_forget_loss(new(x), old(x))
    assert loss.item() > 1e-3
    f_new, f_old = new(x), old(x)
    torch.testing.assert_close(loss, (1 - F.cosine_similarity(f_new, f_old)).mean())
    assert less_forget_weight(5.0, 50, 10) == pytest.approx(5.0 * math.sqrt(5.0))


def test_margin_ranking_loss_on_hand_made_scores():
    # 3 old classes (0..2), 3 new (3..5); samples 0 and 1 are memory (old) samples, sample 2 is new.
    cos = torch.tensor([[0.9, 0.1, 0.0, 0.5, 0.6, 0.2],   # y=0: negatives 0.6, 0.5
                        [0.0, 0.3, 0.1, 0.4, -0.2, 0.7],  # y=1: negatives 0.7, 0.4
                        [0.0, 0.0, 0.0, 0.9, 0.9, 0.9]])  # y=4: not an old sample, ignored
    y = torch.tensor([0, 1, 4])
    # pairs: max(0, .5 - .9 + .6)=.2, max(0, .5 - .9 + .5)=.1, max(0, .5 - .3 + .7)=.9, max(0, .5 - .3 + .4)=.6
    assert margin_ranking_loss(cos, y, n_old=3, k=2, margin=0.5).item() == pytest.approx((0.2 + 0.1 + 0.9 + 0.6) / 4)
    assert margin_ranking_loss(cos, y, n_old=3, k=1, margin=0.5).item() == pytest.approx((0.2 + 0.9) / 2)
    assert margin_ranking_loss(cos, torch.tensor([3, 4, 5]), n_old=3, k=2, margin=0.5).item() == 0.0  # no old sample


def test_backbones_without_last_relu_give_signed_features_with_the_same_weights():
    for name in ("resnet20", "resnet18"):
        torch.manual_seed(0)
        plain = build_backbone(name).eval()
        linear = copy.deepcopy(plain)
        linear.remove_last_relu()
        assert plain.state_dict().keys() == linear.state_dict().keys()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            f_plain, s_plain = plain(x, return_stages=True)
            f_lin, s_lin = linear(x, return_stages=True)
        for a, b in zip(s_plain[:-1], s_lin[:-1]):
            assert torch.equal(a, b)  # only the last block's output changes...
        torch.testing.assert_close(s_plain[-1], s_lin[-1].relu())  # ...by the missing ReLU
        assert (f_lin < 0).any() and not (f_plain < 0).any()
    m = make_method()
    assert (m.net.backbone.layer3[-1].relu_out is False)
    assert make_method(last_relu=True).net.backbone.layer3[-1].relu_out is True


def test_task_one_imprints_new_weights_and_keeps_old_ones_frozen():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    old_block = m.net.head.blocks[0].detach().clone()
    m.begin_task(t1)
    assert not m.net.head.blocks[0].requires_grad and m.net.head.blocks[1].requires_grad
    m.imprint(t1)
    data = m.scenario.train_data(t1)
    for i, c in enumerate(t1.classes):
        f = F.normalize(m.engine.apply(m.net.features, data.of_classes([c])), dim=1)
        direction = F.normalize(f.mean(0), dim=0)
        w = m.net.head.blocks[1][i].detach()
        torch.testing.assert_close(F.normalize(w, dim=0), direction)
        assert w.norm().item() == pytest.approx(old_block.norm(dim=1).mean().item(), rel=1e-5)
    scale_before = m.net.head.scale.item()
    new_before = m.net.head.blocks[1].detach().clone()
    m.train_task(t1)
    assert torch.equal(m.net.head.blocks[0], old_block)  # old class weights bit-for-bit unchanged
    assert not torch.equal(m.net.head.blocks[1], new_before)
    assert m.net.head.scale.item() != scale_before  # sigma is learned
    m.end_task(t1)
    assert m.old_backbone is None


def test_step_adds_the_weighted_less_forget_and_ranking_terms():
    m = make_method()
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    m.old_backbone = copy.deepcopy(m.net.backbone).eval()
    with torch.no_grad():  # a visibly different teacher
        for p in m.old_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.net.eval()
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 4, 5, 6])
    from dynammo.batch import Batch
    loss, logits, _ = m.step(Batch(x, y, x, torch.arange(6)))
    with torch.no_grad():
        feats = m.net.backbone(x)
        cos = m.net.head.similarities(feats)
        want = (F.cross_entropy(m.net.head.scale * cos, y)
                + 5.0 * math.sqrt(4 / 3) * less_forget_loss(feats, m.old_backbone(x))
                + margin_ranking_loss(cos, y, 4, 2, 0.5))
    torch.testing.assert_close(loss.detach(), want)
    torch.testing.assert_close(logits.detach(), m.net(x))


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
    out = tiny_run("ucir")
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["method"] == "ucir"
    assert len(r["acc"]) == 3 and r["forgetting"] is not None
    # the prediction is the argmax of the cosine logits: right over all seen classes implies right
    # within the sample's task, and with one task both are the same number
    assert r["acc"][0] == r["task_il_acc"][0]
    assert all(a <= t for a, t in zip(r["acc"], r["task_il_acc"]))
    assert all(c["memory_exemplars"] > 0 and c["params_trainable"] > 0 for c in r["cost"])
    # one backbone and a cosine head: the inference cost does not grow with the tasks
    g = [c["inference_gflops"] for c in r["cost"]]
    assert max(g) <= min(g) * 1.01
