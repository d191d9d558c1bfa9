"""CODA-Prompt (methods/coda_prompt.py) on the tiny vit_cpu of method_helpers.VIT_TINY (16 px, 4 px patches:
16 patches + CLS = 17 tokens, width 32, 5 blocks, 4 heads), digits in 3 tasks (4, 3, 3 classes), M = 9
components (3 per task) unless a test says otherwise. The spec's assertions (shared/research/prompt_methods.md
section 9) plus CODA's own: old / future rows get no gradient and never move, Gram-Schmidt rows are unit-norm
and orthogonal to every earlier row, alpha is cos(q * A, K), the orthogonality term, the cosine schedule, cost."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import method_helpers
from dynammo.batch import Batch
from dynammo.configure import build_config
from dynammo.cost import count_flops
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods import coda_prompt as coda
from dynammo.methods.base import Method
from dynammo.methods.coda_prompt import CODAPrompt, component_weights, gram_schmidt, ortho_penalty
from dynammo.models.prompting import prefixed_features, query_features
from dynammo.optim import OptimSettings
from method_helpers import snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

D, TOKENS, LAYERS = 32, 17, [0, 1, 2, 3, 4]


def make(**kw) -> CODAPrompt:
    """CODA-Prompt on the tiny scenario, the random ViT frozen at once (no backbone training)."""
    return method_helpers.make_method("coda_prompt", **{"components": 9, "backbone_epochs": 0, **kw})


def grown(n_tasks: int = 3, **kw) -> CODAPrompt:
    """The structure of the first n_tasks tasks (no training), the random ViT frozen."""
    m = make(**kw)
    m.net.freeze_backbone()
    for task in m.scenario.tasks[:n_tasks]:
        m.grow(task)
    return m


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def scatter(m: CODAPrompt, seed: int = 5) -> None:
    """Every component, key and attention vector random (no longer orthonormal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.net.prompts.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def batch_of(m: CODAPrompt, task, n: int = 8) -> Batch:
    data = m.scenario.train_data(task)
    idx = torch.arange(n)
    raw = data.get(idx)
    return Batch(m.engine.test_tf(raw), data.labels[idx], raw, idx)


def reference_logits(m: CODAPrompt, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The formula of the paper with explicit loops over components, for rows [0, rows)."""
    vit, prompts = m.net.vit, m.net.prompts
    q = vit.forward_features(x)[:, 0]
    prefixes = {}
    for i, layer in enumerate(prompts.layers):
        K = torch.cat(list(prompts.keys[i]))[:rows]
        A = torch.cat(list(prompts.attn[i]))[:rows]
        P = torch.cat(list(prompts.components[i]))[:rows]
        p = torch.zeros(x.shape[0], P.shape[1], D)
        for b in range(x.shape[0]):
            for j in range(rows):
                alpha = F.cosine_similarity(q[b] * A[j], K[j], dim=0)
                p[b] += alpha * P[j]
        half = P.shape[1] // 2
        prefixes[layer] = (p[:, :half], p[:, half:])
    return m.net.head(prefixed_features(vit, x, prefixes))


# ---------------------------------------------------------------- registration and configuration


def test_registered_with_aliases_and_the_papers_values():
    for alias in ("coda", "coda_prompt", "CODA-Prompt"):
        assert METHODS.canonical(alias) == "coda_prompt"
    cfg = build_config({"method": "coda", **method_helpers.VIT_TINY})
    # the weight behind the published numbers: the paper's 0.1 times the 1e-6 its code applied
    assert (cfg.components, cfg.prompt_length, cfg.prompt_layers, cfg.ortho_mu) == (100, 8, LAYERS, 1e-7)
    assert cfg.coda_schedule == "coda_cos" and cfg.prompt_grad_clip is None
    # the default is the paper's initialisation; the current official code's is a recorded variant
    assert CODAPrompt.variant_options(cfg) == {}
    official = build_config({"method": "coda", "component_init": "gram_schmidt", **method_helpers.VIT_TINY})
    assert CODAPrompt.variant_options(official) == {"component_init": "gram_schmidt"}
    paper = build_config({"method": "coda", "pretrained": True})
    assert CODAPrompt.variant_options(paper) == {} and CODAPrompt.deviations(paper) == []
    now = build_config({"method": "coda", "ortho_mu": 0.0, "pretrained": True})
    lines = CODAPrompt.deviations(now)
    assert len(lines) == 1 and lines[0].startswith("ortho_mu=0.0 instead of the paper's 1e-07")


@pytest.mark.parametrize("kw, message", [
    (dict(components=10), r"components=10 must be a multiple of the 3 tasks .*use e.g. components=9"),
    (dict(components=2), r"components=2 must be a multiple of the 3 tasks .*use e.g. components=3"),
    (dict(components=100), r"components=100 must be a multiple of the 3 tasks .*use e.g. components=30"),
    (dict(prompt_length=7), r"prompt_length=7 must be even"),
    (dict(components=33), r"components=33 orthogonal keys do not fit the ViT width 32; use at most components=30"),
    (dict(prompt_layers=[0, 5]), r"prompt_layers \[5\] do not exist: the ViT has blocks 0..4"),
])
def test_bad_sizes_are_one_line(kw, message):
    with pytest.raises(UserError, match=message) as err:
        make(**kw)
    assert "\n" not in str(err.value)
    if "prompt_length" not in kw:  # built with the scenario's tasks, not only by the config check
        with pytest.raises(UserError, match=message):
            make(check=False, **kw)


def test_each_task_owns_its_rows_of_every_prompted_block():
    m = grown(1)
    p = m.net.prompts
    assert p.layers == LAYERS and p.per_task == 3 and p.num_tasks == 1
    for i in range(len(LAYERS)):
        assert p.keys[i][0].shape == (3, D) and p.attn[i][0].shape == (3, D) and p.components[i][0].shape == (3, 8, D)
    m.grow(m.scenario.tasks[1])
    assert p.num_tasks == 2 and all(len(group[i]) == 2 for group in (p.keys, p.attn, p.components)
                                    for i in range(len(LAYERS)))
    full = grown(3, components=30)  # the paper's 10 per task
    assert sum(t.numel() for t in full.net.prompts.parameters()) == 5 * (30 * 8 * D + 2 * 30 * D)


# ---------------------------------------------------------------- query, zero-effect prompts, two passes


def test_query_sees_no_prompts_and_has_no_gradient():
    m = grown(3)
    x = images()
    q = query_features(m.net.vit, x)
    assert not q.requires_grad
    torch.testing.assert_close(q, m.net.vit.forward_features(x)[:, 0].detach(), rtol=0, atol=0)
    scatter(m)
    assert torch.equal(q, query_features(m.net.vit, x))


def test_zero_length_components_give_the_frozen_model():
    """Prefix-tuning's zero-effect prompt is the empty one. All-zero components are not: their zero keys still
    take softmax weight exp(0) (with zero values), which scales every attention output down."""
    m = grown(3)
    x = images()
    q = query_features(m.net.vit, x)
    frozen = m.net.vit.forward_features(x)[:, 0]
    with torch.no_grad():
        for group in m.net.prompts.components:
            for t in range(len(group)):
                group[t].zero_()
        assert not torch.allclose(m.prompted_features(x, q, None)[0], frozen, atol=1e-4)
    with torch.no_grad():
        for group in m.net.prompts.components:
            for t in range(len(group)):
                group[t] = torch.nn.Parameter(torch.zeros(3, 0, D))
    m.eval_mode()
    with torch.no_grad():
        for task in (m.scenario.tasks[2], None):
            feats, _ = m.prompted_features(x, q, task)
            torch.testing.assert_close(feats, frozen, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the prompt formula


def test_alpha_is_the_cosine_of_q_times_a_with_k_without_softmax():
    m = grown(3)
    scatter(m)
    q = query_features(m.net.vit, images())
    K, A, _ = m.net.prompts.matrices(2, None)
    alpha = component_weights(q, K, A)
    ref = torch.einsum("bmd,md->bm", F.normalize(torch.einsum("bd,md->bmd", q, A), dim=2), F.normalize(K, dim=1))
    torch.testing.assert_close(alpha, ref, rtol=0, atol=1e-7)
    loops = torch.stack([torch.stack([F.cosine_similarity(q[b] * A[j], K[j], dim=0) for j in range(9)])
                         for b in range(6)]).detach()
    torch.testing.assert_close(alpha, loops, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alpha.sum(1), torch.ones(6))  # no softmax: weights in [-1, 1], any sign
    assert (alpha < 0).any() and alpha.abs().max() <= 1 + 1e-6


def test_prediction_is_the_papers_formula_over_the_rows_of_the_learned_tasks():
    m = grown(2)
    scatter(m)
    m.eval_mode()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(m.predict(x)["logits"], reference_logits(m, x, 6), rtol=1e-4, atol=1e-5)
        prefixes, penalty = m.prefixes(query_features(m.net.vit, x), None)
    assert sorted(prefixes) == LAYERS and float(penalty) == 0.0
    assert all(k.shape == v.shape == (3, 4, D) for k, v in prefixes.values())  # Lp/2 = 4 keys, 4 values


def test_the_key_prefix_feeds_keys_and_the_value_prefix_values():
    m = grown(3)
    scatter(m)
    x = images(3)
    with torch.no_grad():
        prefixes, _ = m.prefixes(query_features(m.net.vit, x), None)
        swapped = {layer: (v, k) for layer, (k, v) in prefixes.items()}
        first_half_values = {layer: (k, k) for layer, (k, v) in prefixes.items()}
        ours = prefixed_features(m.net.vit, x, prefixes)
    assert not torch.allclose(ours, prefixed_features(m.net.vit, x, swapped), atol=1e-4)
    assert not torch.allclose(ours, prefixed_features(m.net.vit, x, first_half_values), atol=1e-4)
    m.eval_mode()
    torch.testing.assert_close(m.predict(x)["logits"], m.net.head(ours), rtol=0, atol=0)


def test_ortho_term_is_zero_for_orthonormal_rows_and_the_mean_squared_gram_error_else():
    q = torch.linalg.qr(torch.randn(20, 7, generator=torch.Generator().manual_seed(0)))[0].T  # 7 orthonormal rows
    assert float(ortho_penalty(q)) < 1e-12
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ortho_penalty(x), ((x @ x.T - torch.eye(5)) ** 2).sum() / 25)
    m = grown(3)  # fresh Gram-Schmidt rows are orthonormal: the penalty is 0 in training
    x = images()
    q = query_features(m.net.vit, x)
    assert abs(float(m.prefixes(q, m.scenario.tasks[2])[1].detach())) < 1e-10
    scatter(m)
    task = m.scenario.tasks[1]  # rows [0, 6) of every block
    expected = sum(ortho_penalty(torch.cat(list(g[i]))[:6].reshape(6, -1)) for i in range(5)
                   for g in (m.net.prompts.keys, m.net.prompts.attn, m.net.prompts.components))
    torch.testing.assert_close(m.prefixes(q, task)[1], 1e-7 * expected)
    assert float(m.prefixes(q, None)[1]) == 0.0  # training only
    zero = grown(3, ortho_mu=0.0)
    scatter(zero)
    assert float(zero.prefixes(q, task)[1]) == 0.0


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
