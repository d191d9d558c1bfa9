"""CODA-Prompt (methods/coda_prompt.py) on the tiny vit_cpu of method_helpers.VIT_TINY (16 px, 4 px patches:
16 patches + CLS = 17 tokens, width 32, 5 blocks, 4 heads), digits in 3 tasks (4, 3, 3 classes), M = 9
components (3 per task) unless a test says otherwise. The spec's assertions (shared/research/prompt_methods.md
section 9) plus CODA's own: the query, zero-effect prompts, alpha is cos(q * A, K), the orthogonality term
(gradients, freezing, Gram-Schmidt, the schedule, the cost and a tiny run: tests/test_coda_prompt_training.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import method_helpers
from dynammo.batch import Batch
from dynammo.configure import build_config
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.coda_prompt import CODAPrompt, component_weights, ortho_penalty
from dynammo.models.prompting import prefixed_features, query_features

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
