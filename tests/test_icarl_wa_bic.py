"""iCaRL, WA and BiC: the shared distillation loss and old model, iCaRL's nearest-mean-of-exemplars
classifier and its checkpoints (WA, BiC and the end-to-end runs: tests/test_wa_bic.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynammo.batch import Batch
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.distill import kd_loss
from dynammo.methods.icarl import class_means_of, nme_predict
from dynammo.metrics import task_il_predictions
from method_helpers import make_method, run_task, same, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


def batch_of(method, data, n: int = 10) -> Batch:
    idx = torch.arange(min(n, len(data)))
    raw = data.get(idx)
    return Batch(method.engine.test_tf(raw), data.labels[idx], raw, idx)


def reloaded(method):
    """A fresh method of the same config with `method`'s checkpoint state loaded."""
    other = make_method(method.cfg.method, **{k: method.cfg[k] for k in method.options})
    other.load_state_dict(method.state_dict())
    other.eval_mode()
    return other


def test_registered_with_aliases_and_faithful_defaults():
    for name, aliases in {"icarl": ("icarl_il",), "wa": ("weight_aligning",), "bic": ("bias_correction",)}.items():
        assert name in METHODS
        assert all(METHODS.canonical(a) == name for a in aliases)
        assert METHODS.get(name).uses_memory and METHODS.get(name).options["T"].default == 2.0
    assert METHODS.get("icarl").options["distill_loss"].default == "kd"  # the reference's loss
    assert METHODS.get("icarl").options["nme_flip"].default is False
    assert METHODS.get("wa").options["wa_preset"].default == "paper"  # the paper's recipe by default
    assert METHODS.get("wa").options["kd_weight"].default is None  # null: the preset's
    assert METHODS.get("wa").options["weight_clipping"].default is None
    assert METHODS.get("bic").options["kd_weight"].default == "adaptive"  # lambda = n_old / n_seen
    assert METHODS.get("bic").options["split_ratio"].default == 0.1


def test_config_checks():
    with pytest.raises(UserError, match="split_ratio"):
        make_method("bic", split_ratio=1.5)
    with pytest.raises(UserError, match="distill_loss"):
        make_method("icarl", distill_loss="mse")
    with pytest.raises(UserError, match="belongs to"):
        make_method("icarl", split_ratio=0.2)
    with pytest.raises(UserError, match="memory"):
        make_method("wa", memory_size=0)


# ---------------------------------------------------------------- the shared distillation


def test_kd_loss_by_hand():
    torch.manual_seed(0)
    new, old, T = torch.randn(5, 7), torch.randn(5, 4), 2.0
    q = torch.softmax(old / T, 1)
    want = -(q * torch.log_softmax(new[:, :4] / T, 1)).sum(1).mean()
    torch.testing.assert_close(kd_loss(new, old, T), want)
    # only the old classes' columns count
    other = new.clone()
    other[:, 4:] = 100.0
    torch.testing.assert_close(kd_loss(other, old, T), want)
    # = KL + the teacher's entropy: minimal (zero gradient) where the student equals the teacher
    student = old.clone().requires_grad_(True)
    kd_loss(torch.cat([student, torch.randn(5, 3)], 1), old, T).backward()
    assert student.grad.abs().max() < 1e-6
    kl = F.kl_div(torch.log_softmax(new[:, :4] / T, 1), q, reduction="batchmean")
    torch.testing.assert_close(kd_loss(new, old, T), kl - (q * q.log()).sum(1).mean())


def test_old_model_is_the_frozen_network_of_the_previous_task_and_rebuilds_from_a_checkpoint():
    m = make_method("wa")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    assert m.old_net is None
    after_t0 = snapshot(m.net)
    ckpt = m.state_dict()
    m.begin_task(t1)
    assert same(snapshot(m.old_net), after_t0)
    assert not any(p.requires_grad for p in m.old_net.parameters()) and not m.old_net.training
    assert m.old_net.head.num_classes == t0.size and m.net.head.num_classes == t1.end
    # a fresh method loaded from task 0's checkpoint rebuilds the same teacher
    other = make_method("wa")
    other.load_state_dict(ckpt)
    other.begin_task(t1)
    assert same(snapshot(other.old_net), after_t0)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(other.old_net(x), m.old_net(x))
    m.train_task(t1)
    assert same(snapshot(m.old_net), after_t0)  # the teacher never trains


@pytest.mark.parametrize("name,weighting", [("icarl", "sum"), ("wa", "sum"), ("bic", "adaptive"), ("wa", "adaptive")])
def test_training_loss_is_ce_plus_kd_on_old_logits(name, weighting):
    m = make_method(name, kd_weight=weighting)
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    batch = batch_of(m, m.training_set(t1), 16)
    loss, logits, y = m.step(batch)
    with torch.no_grad():
        old = m.old_net(batch.x)
    ce, kd = F.cross_entropy(logits, batch.y), kd_loss(logits, old, 2.0)
    lam = t0.size / t1.end
    want = (1 - lam) * ce + lam * kd if weighting == "adaptive" else ce + kd
    torch.testing.assert_close(loss, want)
    assert kd > 0 and old.shape[1] == t0.size and logits.shape[1] == t1.end


# ---------------------------------------------------------------- iCaRL


def hand_means(m, memory) -> torch.Tensor:
    rows = []
    for c in range(m.total):
        x = m.engine.test_tf(memory.per_class[c].images)
        with torch.no_grad():
            f = F.normalize(m.net.features(x), dim=1)
        rows.append(F.normalize(f.mean(0), dim=0))
    return torch.stack(rows)


def test_icarl_nme_uses_the_means_of_the_memory_exemplars():
    m = make_method("icarl")
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    m.eval_mode()
    means = hand_means(m, m.memory)
    assert m.class_means.shape == (m.total, m.net.backbone.out_dim)
    torch.testing.assert_close(m.class_means, means, rtol=1e-5, atol=1e-6)
    test = m.scenario.test_data_seen(m.scenario.tasks[1])
    x = m.engine.test_tf(test.images)
    with torch.no_grad():
        out = m.predict(x)
        f = F.normalize(m.net.features(x), dim=1)
        logits = m.net(x)
    hand = ((f.unsqueeze(1) - means.unsqueeze(0)) ** 2).sum(-1).argmin(1)
    assert torch.equal(out["pred"], hand)  # the headline: the nearest of the hand-computed exemplar means
    assert torch.equal(out["pred_cnn"], logits.argmax(1))  # the CNN head is reported beside it
    assert not torch.equal(out["pred"], logits.argmax(1))  # two different classifiers
    # task-IL: the nearest mean among the sample's own task's classes
    til = task_il_predictions(out["task_il_logits"], test.labels, [(t.start, t.end) for t in m.scenario.tasks[:2]])
    d = ((f.unsqueeze(1) - means.unsqueeze(0)) ** 2).sum(-1)
    for i, y in enumerate(test.labels.tolist()):
        t = m.scenario.tasks[0] if y < m.scenario.tasks[0].end else m.scenario.tasks[1]
        assert til[i] == t.start + d[i, t.start:t.end].argmin()
    m.cfg["icarl_classifier"] = "cnn"  # the other way round: CNN head the headline, NME beside it
    with torch.no_grad():
        swapped = m.predict(x)
    m.cfg["icarl_classifier"] = "nme"
    assert "pred" not in swapped and torch.equal(swapped["pred_nme"], hand)
    # other exemplars -> other means -> other NME predictions
    train = m.scenario.train
    for c in list(m.memory.per_class):
        cls = train.of_classes([c])
        m.memory.per_class[c] = cls.subset(torch.arange(len(cls) - 2, len(cls)))
    m.update_class_means()
    new_means = hand_means(m, m.memory)
    torch.testing.assert_close(m.class_means, new_means, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(new_means, means, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(m.predict(x)["pred"], ((f.unsqueeze(1) - new_means.unsqueeze(0)) ** 2).sum(-1).argmin(1))


def test_nme_predict_and_flip_option_by_hand():
    means = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    feats = torch.tensor([[5.0, 0.1], [0.2, 3.0], [-2.0, -0.5], [10.0, 9.0]])
    assert nme_predict(feats, means).tolist() == [0, 1, 2, 0]
    m = make_method("icarl", nme_flip=True)
    run_task(m, m.scenario.tasks[0])
    m.eval_mode()
    got = m.class_means
    for c in range(m.total):
        x = m.engine.test_tf(m.memory.per_class[c].images)
        with torch.no_grad():
            a = F.normalize(m.net.features(x), dim=1).mean(0)
            b = F.normalize(m.net.features(x.flip(-1)), dim=1).mean(0)
        torch.testing.assert_close(got[c], F.normalize((a + b) / 2, dim=0), rtol=1e-5, atol=1e-6)
    plain = class_means_of(m.memory, m.features, m.total)
    assert not torch.allclose(plain, got)


def test_icarl_bce_option_is_the_papers_loss():
    m = make_method("icarl", distill_loss="bce")
    t0, t1 = m.scenario.tasks[:2]
    run_task(m, t0)
    m.begin_task(t1)
    batch = batch_of(m, m.training_set(t1), 16)
    loss, logits, _ = m.step(batch)
    target = F.one_hot(batch.y, t1.end).float()
    with torch.no_grad():
        target[:, : t0.size] = torch.sigmoid(m.old_net(batch.x))
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))


def test_icarl_checkpoint_reload_gives_identical_cnn_and_nme_predictions():
    m = make_method("icarl")
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    m.eval_mode()
    other = reloaded(m)
    assert torch.equal(other.class_means, m.class_means)
    x = m.engine.test_tf(m.scenario.test_data_seen(m.scenario.tasks[1]).images)
    with torch.no_grad():
        a, b = m.predict(x), other.predict(x)
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["logits"], b["logits"])
