"""DER++ (dark experience replay): the buffer stores the logits it replays, the logit-replay term,
checkpoints and memory accounting, and an end-to-end run of the `dynammo` command."""
from __future__ import annotations

import json

import pytest
import torch

from dynammo.batch import Batch
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.der_pp import stored_logits_mse

import method_helpers
from method_helpers import run_task

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(method_helpers.TINY, memory_size=40)


def make_method(**kw):
    return method_helpers.make_method("der_pp", TINY, **kw)


def batch_of(method, task, idx) -> Batch:
    data = method.scenario.train_data(task)
    raw = data.get(idx)
    return Batch(method.engine.train_tf(raw), data.labels[idx], raw, idx)


def test_names_never_confuse_der_pp_with_der():
    for alias in ("der_pp", "dark_er", "derpp", "der++", "DER_PP"):
        assert METHODS.canonical(alias) == "der_pp"
    assert METHODS.canonical("der") == "der"
    assert "not DER" in METHODS.get("der_pp").summary and "Dark Experience Replay" in METHODS.get("der_pp").summary


@pytest.mark.parametrize("full_head", [True, False])
def test_buffer_stores_the_logits_the_model_gave_its_raw_images(full_head):
    m = make_method(full_head=full_head)
    task = m.scenario.tasks[0]
    m.begin_task(task)
    m.eval_mode()  # BatchNorm on running statistics: a sample's logits do not depend on its batch
    b = batch_of(m, task, torch.arange(10))
    with torch.no_grad():
        all_logits = m.net(b.x)
    m.step(b)
    buf = m.buffer
    assert len(buf) == 10
    assert torch.equal(buf.images[:10], b.raw) and torch.equal(buf.labels[:10], b.y)
    assert torch.allclose(buf.extras["logits"][:10], all_logits, atol=1e-6)
    with torch.no_grad():  # recomputed from the stored raw images
        again = m.net(m.engine.test_tf(buf.images[:10]))
    assert torch.allclose(buf.extras["logits"][:10], again, atol=1e-5)
    width = 10 if full_head else task.size  # the paper's head has every class from the start
    assert buf.extras["logits"].shape[1] == width and buf.extras["logit_cols"][:10].tolist() == [width] * 10
    assert m.predict(b.x)["logits"].shape == (10, task.size)  # prediction over the seen classes only


def test_logit_replay_is_zero_for_an_unchanged_model_and_not_otherwise():
    m = make_method()
    task = m.scenario.tasks[0]
    m.begin_task(task)
    m.eval_mode()
    with torch.no_grad():
        m.step(batch_of(m, task, torch.arange(30)))
        assert float(m.logit_replay_loss()) < 1e-10
        m.net.head.fc.bias.add_(0.5)  # the model moved: its logits drift away from the stored ones
        assert float(m.logit_replay_loss()) == pytest.approx(0.25, rel=1e-4)


def test_stored_logits_compare_only_their_own_columns():
    stored = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # row 0 was stored with 2 classes
    cols = torch.tensor([2, 4])
    now = torch.tensor([[2.0, 2.0, 9.0, 9.0, 5.0], [1.0, 1.0, 1.0, 3.0, 5.0]])  # the head grew to 5
    # squared errors over stored entries: row 0: 1, 0; row 1: 0, 0, 0, 4 -> 5 / 6
    assert float(stored_logits_mse(now, stored, cols)) == pytest.approx(5 / 6)


def test_replay_terms_enter_the_loss_with_their_weights(monkeypatch):
    m = make_method(alpha=0.3, beta=0.7)
    task = m.scenario.tasks[0]
    m.begin_task(task)
    m.eval_mode()
    b = batch_of(m, task, torch.arange(8))
    monkeypatch.setattr(m, "logit_replay_loss", lambda: torch.tensor(2.0))
    monkeypatch.setattr(m, "label_replay_loss", lambda: torch.tensor(10.0))
    plain, _, _ = m.step(b)  # the buffer was empty: cross-entropy only
    with_replay, _, _ = m.step(b)
    assert float((with_replay - plain).detach()) == pytest.approx(0.3 * 2.0 + 0.7 * 10.0, rel=1e-4)


def test_buffer_is_in_the_checkpoint_and_the_memory_accounting():
    m = make_method()
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    buf = m.buffer
    assert len(buf) == 40 and buf.seen == 12 * 7  # 4 + 3 classes x 12 images, one epoch
    assert buf.extras["logits"].shape == (40, 10) and set(buf.extras["logit_cols"].tolist()) == {10}
    assert m.memory_stats() == (40, 40 * (1 * 8 * 8 + 10 * 4 + 8))  # uint8 image + 10 float logits + width
    assert m.memory_budget(7) == 40

    fresh = make_method(seed=7)
    fresh.load_state_dict(m.state_dict())
    assert fresh.buffer.seen == buf.seen and fresh.memory_stats() == m.memory_stats()
    assert torch.equal(fresh.buffer.images, buf.images) and torch.equal(fresh.buffer.labels, buf.labels)
    for k in ("logits", "logit_cols"):
        assert torch.equal(fresh.buffer.extras[k], buf.extras[k])
    m.eval_mode()
    fresh.eval_mode()
    x = m.engine.test_tf(m.scenario.test.get(torch.arange(20)))
    assert m.predict(x)["logits"].shape == (20, 7)
    assert torch.equal(m.predict(x)["logits"], fresh.predict(x)["logits"])


def test_growing_head_stores_rows_of_the_width_they_had():
    m = make_method(full_head=False)
    for task in m.scenario.tasks[:2]:
        run_task(m, task)
    buf = m.buffer
    assert set(buf.extras["logit_cols"].tolist()) == {4, 7} and buf.extras["logits"].shape == (40, 7)
    narrow = buf.extras["logit_cols"] == 4
    assert (buf.extras["logits"][narrow, 4:] == 0).all()  # zero-padded, and ignored by the MSE
    fresh = make_method(full_head=False, seed=7)
    fresh.load_state_dict(m.state_dict())
    assert fresh.net.head.num_classes == 7


def test_config_checks():
    with pytest.raises(UserError, match="memory_per_class"):
        make_method(memory_per_class=5)
    with pytest.raises(UserError, match="memory_size"):
        make_method(memory_size=0)


def test_end_to_end_cli(tiny_run):
    """The shared tiny run (conftest `tiny_run`; tests/test_method_contract.py checks its reload,
    export, cost, resume and reproducibility)."""
    out = tiny_run("der_pp")
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and r["method"] == "der_pp"
    assert len(r["acc"]) == 3 and r["avg_acc"] is not None and r["forgetting"] is not None
    assert [c["memory_exemplars"] for c in r["cost"]] == [30, 30, 30]
    # every slot: a 64-byte image, the 10 logits of the full head (float32) and its width (int64)
    assert [c["memory_bytes"] for c in r["cost"]] == [30 * (64 + 10 * 4 + 8)] * 3
    state = torch.load(out / "checkpoints" / "task_2.pt", map_location="cpu", weights_only=False)
    assert state["state"]["memory"]["extras"]["logits"].shape == (30, 10)
    assert state["config"]["alpha"] == 0.1 and state["config"]["beta"] == 0.5
