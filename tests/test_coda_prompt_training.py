"""CODA-Prompt (methods/coda_prompt.py) in training, on the tiny setting of tests/test_coda_prompt.py:
old / future rows get no gradient and never move, Gram-Schmidt rows are unit-norm and orthogonal to
every earlier row, checkpoints, batch independence, the cosine schedule, the cost, and a tiny run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import method_helpers
from dynammo.cost import count_flops
from dynammo.methods import coda_prompt as coda
from dynammo.methods.base import Method
from dynammo.methods.coda_prompt import CODAPrompt, gram_schmidt
from dynammo.models.prompting import query_features
from dynammo.optim import OptimSettings
from method_helpers import snapshot
from test_coda_prompt import D, LAYERS, TOKENS, batch_of, grown, images, make, scatter

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- gradients and freezing


def loss_of_task_1(m: CODAPrompt):
    task = m.scenario.tasks[1]
    m.train_mode()
    m.current_task = task
    b = batch_of(m, task)
    loss, logits, _ = m.step(b)
    return task, b, loss, logits


def test_only_the_current_tasks_rows_and_the_head_get_gradients():
    m = grown(2)  # training task 1: rows [3, 6) trainable, rows [0, 3) frozen, rows [6, 9) do not exist yet
    scatter(m)
    task, b, loss, logits = loss_of_task_1(m)
    loss.backward()
    p = m.net.prompts
    for i in range(5):
        for group in (p.keys, p.attn, p.components):
            assert group[i][0].grad is None  # old rows: detached
            assert group[i][1].grad is not None and group[i][1].grad.abs().sum() > 0
            assert len(group[i]) == 2  # future rows are not part of the model yet
    assert all(p.grad is None and not p.requires_grad for p in m.net.backbone.parameters())
    assert set(map(id, m.trainable())) == set(map(id, p.task_parameters(1))) | set(map(id, m.net.head.parameters()))
    # the masked cross-entropy: old-class head rows get exactly zero gradient, CE = CE over task 1's logits
    w = m.net.head.fc.weight.grad
    assert torch.all(w[: task.start] == 0) and w[task.start: task.end].abs().sum() > 0
    assert torch.isinf(logits[:, : task.start]).all()
    ce = F.cross_entropy(logits, b.y)
    torch.testing.assert_close(ce, F.cross_entropy(logits[:, task.start: task.end], b.y - task.start))
    torch.testing.assert_close(loss - ce, m.prefixes(query_features(m.net.vit, b.x), task)[1])


def test_training_never_moves_old_rows_even_with_weight_decay_and_momentum():
    m = make(weight_decay=0.1, opt_type="sgd", opt_mom=0.9, lrate=0.5)
    m.net.freeze_backbone()
    method_helpers.run_task(m, m.scenario.tasks[0])
    before = snapshot(m.net.prompts)
    method_helpers.run_task(m, m.scenario.tasks[1])
    after = m.net.prompts.state_dict()
    old = [k for k in before if k.endswith(".0")]
    assert len(old) == len(before) == 15 and all(torch.equal(before[k], after[k]) for k in old)
    assert len(after) == 30


def test_trained_rows_move():
    m = make(opt_type="adam", lrate=1e-2, weight_decay=0.0)
    m.net.freeze_backbone()
    task = m.scenario.tasks[0]
    m.begin_task(task)
    start = snapshot(m.net.prompts)
    m.train_task(task)
    after = m.net.prompts.state_dict()
    assert all(not torch.equal(start[k], after[k]) for k in start)


def test_training_and_test_use_the_same_rows_of_every_learned_task():
    """Training task t and testing after it both use rows [0, f) (f = (t + 1) M / T): the same prefixes,
    the paper's formula; the rows of later tasks do not exist before their task starts."""
    m = grown(2)
    scatter(m)
    x = images(3)
    q = query_features(m.net.vit, x)
    with torch.no_grad():
        train, _ = m.prefixes(q, m.scenario.tasks[1])
        test, _ = m.prefixes(q, None)
    for layer in LAYERS:
        assert torch.equal(train[layer][0], test[layer][0]) and torch.equal(train[layer][1], test[layer][1])
    assert all(len(g[i]) == 2 for g in (m.net.prompts.keys, m.net.prompts.attn, m.net.prompts.components)
               for i in range(5))
    # rows >= f, were they there, take no part: perturbing task 2's rows leaves task 1's forward as it is
    m.grow(m.scenario.tasks[2])
    with torch.no_grad():
        for group in (m.net.prompts.keys, m.net.prompts.attn, m.net.prompts.components):
            for i in range(5):
                group[i][2].normal_()
        again, _ = m.prefixes(q, m.scenario.tasks[1])
        m.eval_mode()
        assert not torch.equal(m.prefixes(q, None)[0][0][0], test[0][0])  # the 3-task model uses them
    for layer in LAYERS:
        assert torch.equal(again[layer][0], train[layer][0]) and torch.equal(again[layer][1], train[layer][1])


# ---------------------------------------------------------------- initialisation


def check_new_rows(new: torch.Tensor, old: torch.Tensor) -> None:
    new, old = new.reshape(new.shape[0], -1).double(), old.reshape(old.shape[0], -1).double()
    torch.testing.assert_close(new.norm(dim=1), torch.ones(new.shape[0], dtype=torch.float64), rtol=0, atol=1e-6)
    assert (new @ old.T).abs().max() < 1e-5
    gram = new @ new.T
    assert (gram - torch.eye(new.shape[0], dtype=torch.float64)).abs().max() < 1e-5


@pytest.mark.parametrize("components", [9, 30])
def test_gram_schmidt_rows_are_unit_norm_and_orthogonal_to_every_earlier_row(components):
    m = make(components=components, component_init="gram_schmidt")
    m.net.freeze_backbone()
    task0, task1 = m.scenario.tasks[:2]
    m.begin_task(task0)
    scatter(m)  # earlier rows as training leaves them: not orthogonal to each other, not unit-norm
    before = snapshot(m.net.prompts)
    Method.begin_task(m, task1)  # the head grows (the global RNG) ...
    rng = torch.get_rng_state()
    m.start_task(task1)  # ... Gram-Schmidt does not touch it
    assert torch.equal(rng, torch.get_rng_state())
    p = m.net.prompts
    after = p.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # old rows bitwise unchanged
    for i in range(5):
        for group in (p.keys, p.attn, p.components):
            check_new_rows(group[i][1].detach(), group[i][0].detach())
    assert p.keys[0][1].device == p.keys[0][0].device and p.keys[0][1].dtype == torch.float32


def test_gram_schmidt_is_deterministic_from_the_seed_and_drawn_per_task():
    a, b, c = (grown(3, component_init="gram_schmidt"), grown(3, component_init="gram_schmidt"),
               grown(3, component_init="gram_schmidt", seed=1))
    sa, sb, sc = (x.net.prompts.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not torch.equal(sa["keys.0.1"], sa["keys.0.0"][:3]) and not torch.equal(sa["keys.0.0"], sa["keys.1.0"])
    for i in range(5):  # grown without training: all 9 rows orthonormal
        K = torch.cat(list(a.net.prompts.keys[i])).double()
        assert (K @ K.T - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-5


def test_gram_schmidt_helper():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 6, generator=g) * 3
    new = gram_schmidt(old, 2, g)
    check_new_rows(new, old)
    with pytest.raises(ValueError, match="7 orthogonal rows do not fit in 6"):
        gram_schmidt(old, 3, g)
    assert gram_schmidt(torch.zeros(0, 6), 6, g).shape == (6, 6)


def test_paper_initialisation_is_one_orthogonal_matrix_of_all_rows():
    m = grown(3, component_init="orthogonal")
    p = m.net.prompts
    for i in range(5):
        for group in (p.keys, p.attn, p.components):
            X = torch.cat(list(group[i])).reshape(9, -1).double()
            assert (X @ X.T - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-5
    # a task's rows do not depend on what earlier tasks became (drawn from the seed at the start)
    n = grown(1, component_init="orthogonal")
    scatter(n)
    n.grow(n.scenario.tasks[1])
    assert torch.equal(n.net.prompts.keys[3][1], p.keys[3][1])


def test_a_checkpoint_restores_the_trained_rows():
    m = make()
    m.net.freeze_backbone()
    for task in m.scenario.tasks[:2]:
        method_helpers.run_task(m, task)
    state = m.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert fresh.net.prompts.num_tasks == 2
    m.eval_mode()
    fresh.eval_mode()
    x = images()
    with torch.no_grad():
        assert torch.equal(m.predict(x)["logits"], fresh.predict(x)["logits"])


# ---------------------------------------------------------------- batch independence, schedule, cost


def test_eval_logits_do_not_depend_on_the_batch():
    m = grown(3)
    scatter(m)
    m.eval_mode()
    x = images(7)
    with torch.no_grad():
        batch = m.predict(x)["logits"]
        alone = torch.cat([m.predict(x[i: i + 1])["logits"] for i in range(7)])
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
        permuted = m.predict(x[perm])["logits"]
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted, batch[perm], rtol=1e-5, atol=1e-6)


def test_coda_cosine_schedule_per_epoch(monkeypatch):
    E = 5
    settings = coda.CodaCosine(**vars(OptimSettings(epochs=E, opt_type="adam", lrate=1e-3)))
    opt = settings.optimizer([torch.nn.Parameter(torch.zeros(1))])
    sched = settings.schedule(opt)
    lrs = []
    for _ in range(E):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * math.cos(99 * math.pi * e / (200 * (E - 1))) for e in range(E)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-3 * math.cos(99 * math.pi / 200))  # not 0 at the last epoch
    assert coda.coda_cosine_factor(0, 1) == 1.0
    # the run hands that schedule to the engine, or the configured one with coda_schedule=config
    seen = []
    for choice, kind in (("coda_cos", coda.CodaCosine), ("config", OptimSettings)):
        m = make(coda_schedule=choice)
        monkeypatch.setattr(m.engine, "fit", lambda params, data, loss, settings, **k: seen.append(type(settings)))
        task = m.scenario.tasks[0]
        m.begin_task(task)
        m.train_task(task)
        assert seen[-1] is kind


def test_predict_costs_the_query_pass_plus_the_prefixed_pass():
    m = grown(3)
    m.eval_mode()
    x = images(1)
    plain = count_flops(m.net.vit.forward_features, x)
    prefix_extra = 5 * 2 * 2 * TOKENS * 4 * D  # q.k and attn.v against 4 prefix tokens at 5 blocks
    assemble = 5 * (2 * 9 * D + 2 * 9 * 8 * D)  # alpha (9 cosines) and sum_m alpha_m P_m per block
    head = 2 * D * 10
    total = count_flops(m.predict, x)
    # the counter counts matmuls and attention (the elementwise q * A and the norms are free): exact
    assert total == 2 * plain + prefix_extra + assemble + head
    assert total - 2 * plain > 0.5 * prefix_extra  # the prefixes are counted
    longer = grown(3, prompt_length=16)
    longer.eval_mode()
    # 4 more K/V prefixes at 5 blocks, and 8 more rows of every component to sum
    assert count_flops(longer.predict, x) - total == 5 * (2 * 2 * TOKENS * 4 * D + 2 * 9 * 8 * D)


# ---------------------------------------------------------------- end to end


def test_a_tiny_run_ends_with_an_accuracy_per_task(run_in_process, tmp_path):
    out = tmp_path / "run"
    assert run_in_process("run", "--out", str(out), *method_helpers.tiny_run_args("coda_prompt", components=9)) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "complete" and len(r["acc"]) == len(r["tasks"]) == 3
    assert all(0.0 <= a <= 100.0 for a in r["acc"])
