"""DualPrompt (methods/dualprompt.py) on the tiny vit_cpu of method_helpers.VIT_TINY (16 px, 4 px patches:
16 patches + CLS = 17 tokens, width 32, 5 blocks, 4 heads), digits in 3 tasks (4, 3, 3 classes), so the
E-prompt pool has 3 entries. The spec's assertions (shared/research/prompt_methods.md section 9) plus
DualPrompt's own: the task-id trick at training, per-sample argmax-cos at test over the learned keys only,
batch independence (gradients, task start, prefixes, cost and a tiny run: tests/test_dualprompt_training.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import method_helpers
from dynammo.configure import build_config
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.dualprompt import DualPrompt, DualPromptModule, l2_normalize
from dynammo.models.prompting import prefixed_features, query_features
from method_helpers import make_method

pytestmark = pytest.mark.usefixtures("single_thread")

D, TOKENS = 32, 17


def grown(n_tasks: int = 3, **kw) -> DualPrompt:
    """DualPrompt with the structure of its first n_tasks tasks (no training; the random ViT frozen)."""
    m = make_method("dualprompt", **kw)
    for task in m.scenario.tasks[:n_tasks]:
        m.grow(task)
    return m


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def scatter_entries(m: DualPrompt) -> None:
    """Make every pool entry different (grow copied e_{t-1} into e_t)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.net.prompts.e_prompts:
            p.uniform_(-1.0, 1.0)


def keys_from_samples(m: DualPrompt, q: torch.Tensor, rows) -> None:
    """Key m := q[rows[m]]: sample rows[m] has cosine 1 with key m."""
    with torch.no_grad():
        for entry, row in enumerate(rows):
            m.net.prompts.e_keys[entry].copy_(q[row])


def with_entries(m: DualPrompt, x: torch.Tensor, entries) -> torch.Tensor:
    """Head logits of x[b] run alone with E-prompt entries[b] (the reference per-sample computation)."""
    out = []
    for b, entry in enumerate(entries):
        e = m.net.prompts.e_prompts[int(entry)].unsqueeze(0)
        out.append(m.net.head(prefixed_features(m.net.vit, x[b:b + 1], m.net.prompts.prefixes(e))))
    return torch.cat(out)


# ---------------------------------------------------------------- registration and configuration


def test_registered_with_alias_and_paper_defaults():
    assert METHODS.canonical("dual_prompt") == "dualprompt"
    cfg = build_config({"method": "dualprompt", **method_helpers.VIT_TINY})
    assert (cfg.g_prompt_layers, cfg.e_prompt_layers, cfg.g_prompt_length, cfg.e_prompt_length) == ([0, 1], [2, 3, 4], 5, 5)
    assert cfg.pull_weight == 1.0 and cfg.prompt_grad_clip == 1.0 and cfg.shared_prompt_pool is True
    assert cfg.prompt_init == "uniform"
    assert DualPrompt.variant_options(cfg) == {}


def test_e_prompt_length_paper_value_depends_on_the_dataset():
    def variant(**kw):
        return DualPrompt.variant_options(build_config({"method": "dualprompt", **kw}))

    assert variant(dataset="imagenet_r", e_prompt_length=20) == {}
    assert variant(dataset="imagenet-r", e_prompt_length=5) == {"e_prompt_length": 5}
    assert variant(dataset="cifar100", e_prompt_length=20) == {"e_prompt_length": 20}
    lines = DualPrompt.deviations(build_config({"method": "dualprompt", "dataset": "imagenet_r", "pretrained": True,
                                                "e_prompt_length": 5}))
    assert len(lines) == 1 and lines[0].startswith("e_prompt_length=5 instead of the paper's 20")


def test_too_shallow_a_vit_is_one_line():
    with pytest.raises(UserError, match=r"has 4 blocks; use a ViT with at least 5 \(e.g. vit_depth=5") as err:
        make_method("dualprompt", vit_depth=4)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"blocks \[2\] are in both"):
        make_method("dualprompt", g_prompt_layers=[0, 2])
    with pytest.raises(UserError, match="has 4 blocks"):  # also without the config check
        make_method("dualprompt", vit_depth=4, check=False)
    with pytest.raises(UserError, match="has 12 blocks"):
        make_method("dualprompt", backbone="vit_tiny_patch16_224", e_prompt_layers=[2, 12], img_size=16)


def test_pool_has_one_entry_and_one_key_per_task_and_the_papers_shapes():
    m = grown(1)
    p = m.net.prompts
    assert p.pool_size == len(m.scenario.tasks) == 3
    assert p.g_prompt.shape == (2, 2, 5, D)
    assert all(e.shape == (3, 2, 5, D) for e in p.e_prompts) and all(k.shape == (D,) for k in p.e_keys)
    assert all(-1 <= float(t.detach().min()) and float(t.detach().max()) <= 1 for t in p.parameters())  # U(-1, 1), DP-pt's init
    assert grown(1, e_prompt_length=20).net.prompts.e_prompts[0].shape == (3, 2, 20, D)
    jax = grown(1, prompt_init="jax").net.prompts  # the JAX code's flax uniform(): U[0, 0.01)
    assert all(0 <= float(t.detach().min()) and float(t.detach().max()) < 0.01 for t in jax.parameters())


# ---------------------------------------------------------------- query, zero-effect prompts, two passes


def test_query_sees_no_prompts_and_has_no_gradient():
    m = grown(3)
    x = images()
    q = query_features(m.net.vit, x)
    assert not q.requires_grad
    torch.testing.assert_close(q, m.net.vit.forward_features(x)[:, 0].detach(), rtol=0, atol=0)
    with torch.no_grad():
        for p in m.net.prompts.parameters():
            p.normal_()
    assert torch.equal(q, query_features(m.net.vit, x))


def test_zero_length_prompts_give_the_frozen_model():
    m = grown(3, g_prompt_length=0, e_prompt_length=0)
    m.eval_mode()
    x = images()
    frozen = m.net.vit.forward_features(x)[:, 0]
    q = query_features(m.net.vit, x)
    with torch.no_grad():
        for task in (m.scenario.tasks[1], None):
            feats, _ = m.prompted_features(x, q, task)
            torch.testing.assert_close(feats, frozen, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- selection


def test_training_uses_entry_t_whatever_the_keys_say():
    m = grown(3)
    scatter_entries(m)
    task = m.scenario.tasks[1]
    m.train_mode()
    x = images()
    q = query_features(m.net.vit, x)
    keys_from_samples(m, q, [0, 1, 2])  # entries 0 and 2 now match samples better than entry 1 does
    with torch.no_grad():
        m.net.prompts.e_keys[1].copy_(-q.mean(0))
    assert (m.net.prompts.select(q, 3) != 1).all()  # the precondition: the match never says entry 1
    feats, extra = m.prompted_features(x, q, task)
    e1 = m.net.prompts.e_prompts[1].unsqueeze(0)
    ref = prefixed_features(m.net.vit, x, m.net.prompts.prefixes(e1))
    torch.testing.assert_close(feats, ref, rtol=0, atol=0)
    e0 = m.net.prompts.e_prompts[0].unsqueeze(0)
    assert not torch.allclose(feats, prefixed_features(m.net.vit, x, m.net.prompts.prefixes(e0)), atol=1e-4)
    # the pull term: -lambda * mean_b cos(q_b, k_t), with k_t = k_1 only
    cos = F.cosine_similarity(q, m.net.prompts.e_keys[1].unsqueeze(0), dim=1)
    torch.testing.assert_close(extra, -1.0 * cos.mean())
    m2 = grown(3, pull_weight=0.25)
    m2.net.prompts.load_state_dict(m.net.prompts.state_dict())
    torch.testing.assert_close(m2.prompted_features(x, q, task)[1], -0.25 * cos.mean())


def test_test_uses_each_samples_argmax_cosine_entry():
    m = grown(3)
    scatter_entries(m)
    m.eval_mode()
    x = images()
    with torch.no_grad():
        q = query_features(m.net.vit, x)
        keys_from_samples(m, q, [3, 0, 5])  # sample 3 -> entry 0, sample 0 -> entry 1, sample 5 -> entry 2
        cos = l2_normalize(q) @ l2_normalize(torch.stack(list(m.net.prompts.e_keys))).t()
        chosen = cos.argmax(1)
        assert chosen[3] == 0 and chosen[0] == 1 and chosen[5] == 2
        assert torch.equal(m.net.prompts.select(q, 3), chosen)
        out = m.predict(x)
        torch.testing.assert_close(out["logits"], with_entries(m, x, chosen), rtol=1e-5, atol=1e-5)
        assert torch.equal(out["task_id"], chosen)  # the runner's task-id accuracy: how often the match is right
        torch.testing.assert_close(out["task_il_logits"], torch.softmax(out["logits"], dim=1))


def test_keys_of_future_tasks_never_compete():
    m = grown(2)  # tasks 0 and 1 learned; entry 2 exists (the pool has M = 3) but is not yet a task's
    scatter_entries(m)
    m.eval_mode()
    x = images()
    with torch.no_grad():
        q = query_features(m.net.vit, x)
        keys_from_samples(m, q, [1, 2, 0])  # over all 3 keys, sample 0 would pick entry 2
        assert m.net.prompts.select(q, 3)[0] == 2
        chosen = m.net.prompts.select(q, 2)
        assert chosen.max() <= 1
        torch.testing.assert_close(m.predict(x)["logits"], with_entries(m, x, chosen), rtol=1e-5, atol=1e-5)


def reshape_bug_prefixes(self, e):
    """DP-pt's bug (spec 8.2): the (layers, 2, B, ...) prefixes reshaped, not permuted, to (layers, B, 2, ...)."""
    out = {layer: (self.g_prompt[i, 0].unsqueeze(0), self.g_prompt[i, 1].unsqueeze(0))
           for i, layer in enumerate(self.g_layers)}
    wrong = e.permute(1, 2, 0, 3, 4).reshape(e.shape[1], e.shape[0], 2, *e.shape[3:])
    out.update({layer: (wrong[j][:, 0], wrong[j][:, 1]) for j, layer in enumerate(self.e_layers)})
    return out


def batch_independent(m: DualPrompt, x: torch.Tensor) -> bool:
    """Logits of the batch == each sample alone, and invariant to permuting the batch."""
    with torch.no_grad():
        together = m.predict(x)["logits"]
        alone = torch.cat([m.predict(x[b:b + 1])["logits"] for b in range(len(x))])
        perm = torch.tensor([4, 2, 0, 5, 1, 3])
        permuted = m.predict(x[perm])["logits"]
    return torch.allclose(together, alone, atol=1e-5) and torch.allclose(permuted, together[perm], atol=1e-5)


def test_eval_batch_independence_with_per_sample_selection_catches_the_reshape_bug(monkeypatch):
    m = grown(3)
    scatter_entries(m)
    m.eval_mode()
    x = images()
    with torch.no_grad():
        keys_from_samples(m, query_features(m.net.vit, x), [0, 1, 2])
        assert len(set(m.net.prompts.select(query_features(m.net.vit, x), 3).tolist())) == 3  # a mixed batch
    assert batch_independent(m, x)
    monkeypatch.setattr(DualPromptModule, "prefixes", reshape_bug_prefixes)
    assert not batch_independent(m, x)  # the test above would fail on DP-pt's reshape
