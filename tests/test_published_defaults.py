"""The prompt methods' defaults are the published ones (issue 22): L2P's U(0, 1) prompt and key init,
CODA-Prompt's effective orthogonality weight 1e-7, CODA's per-seed class order, and the CODA shared
protocol's recipe (no clipping, CODA's cosine) for L2P and DualPrompt; the old values stay options."""
from __future__ import annotations

import random

import pytest
import torch

import method_helpers
from dynammo.configure import build_config, load_config
from dynammo.data.scenario import make_class_order
from dynammo.methods import METHODS
from dynammo.methods.prompt_base import CodaCosine, coda_cosine_factor

pytestmark = pytest.mark.usefixtures("single_thread")


def test_l2p_prompts_and_keys_start_uniform_on_0_1_as_l2p_pytorch():
    m = method_helpers.make_method("l2p")
    pool = m.net.prompts
    for t in (pool.prompts.detach(), pool.keys.detach()):
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0 and 0.4 < float(t.mean()) < 0.6
    cfg = build_config({"method": "l2p", **method_helpers.VIT_TINY, "pretrained": True})
    assert METHODS.get("l2p").deviations(cfg) == []
    old = method_helpers.make_method("l2p", prompt_init="symmetric").net.prompts  # what ran before: U(-1, 1)
    assert float(old.keys.min()) < -0.5 and float(old.keys.max()) > 0.5
    jax = method_helpers.make_method("l2p", prompt_init="jax").net.prompts
    assert float(jax.keys.min()) >= 0.0 and float(jax.keys.max()) < 0.01
    sym = build_config({"method": "l2p", "prompt_init": "symmetric", **method_helpers.VIT_TINY})
    assert METHODS.get("l2p").label(sym) == "l2p [prompt_init=symmetric]"


def test_coda_orthogonality_weight_is_the_one_behind_the_published_numbers():
    cfg = build_config({"method": "coda_prompt", **method_helpers.VIT_TINY})
    assert cfg.ortho_mu == pytest.approx(1e-7)
    paper_text = build_config({"method": "coda_prompt", "ortho_mu": 0.1, "pretrained": True})
    assert METHODS.get("coda_prompt").deviations(paper_text)[0].startswith("ortho_mu=0.1 instead of the paper's 1e-07")


def test_coda_class_order_is_natural_for_seed_0_and_python_shuffled_otherwise():
    assert make_class_order(100, None, True, 0, "coda") == list(range(100))
    expected = list(range(100))
    random.seed(3)
    random.shuffle(expected)  # CODA-Prompt's trainer.py
    assert make_class_order(100, None, True, 3, "coda") == expected
    assert make_class_order(100, None, True, 3) != expected  # the default rule is numpy's permutation
    for name in ("cifar100_coda", "imagenet_r_coda"):
        cfg = load_config([name, "coda_prompt"])
        assert cfg.shuffle is True and cfg.shuffle_rule == "coda" and cfg.seed == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_l2p_and_dualprompt_under_codas_protocol_train_as_codas_reimplementation(method):
    for name in ("cifar100_coda", "imagenet_r_coda"):
        cfg = load_config([name, method])
        assert cfg.prompt_grad_clip is None and cfg.coda_schedule == "coda_cos", (name, method)
    m = method_helpers.make_method(method, epochs=5, coda_schedule="coda_cos")
    settings = m.optim_settings(m.scenario.tasks[0])
    assert isinstance(settings, CodaCosine)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = settings.schedule(opt)
    rates = []
    for _ in range(5):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([coda_cosine_factor(e, 5) for e in range(5)])
    # under their own papers' protocols the configured schedule (and clipping) stay
    assert not isinstance(method_helpers.make_method(method).optim_settings(m.scenario.tasks[0]), CodaCosine)
    assert load_config(["cifar100_l2p", method]).coda_schedule == "config"


def test_a_frozen_backbone_method_without_weights_says_so_once_and_others_never():
    """The no-weights line comes from Method.paper_backbone: exactly one line for each method that
    freezes a pretrained backbone in its paper (after the option lines, before the method's own), none
    with weights, none for a method that trains its backbone."""
    frozen = {"simplecil", "aper", "ranpac", "l2p", "dualprompt", "coda_prompt", "acl", "dynammo"}
    for name in METHODS.names():
        cls = METHODS.get(name)
        without = cls.deviations(load_config(["mednist_cpu"], [f"method={name}"]))
        lines = [d for d in without if "no pretrained weights" in d]
        assert len(lines) == (name in frozen), (name, without)
        assert not any("no pretrained weights" in d
                       for d in cls.deviations(load_config(["mednist_cpu"], [f"method={name}", "pretrained=true"])))
        if lines:
            assert cls.paper_backbone in lines[0]
    ranpac = METHODS.get("ranpac").deviations(load_config(["mednist_cpu"], ["method=ranpac", "ranpac_adapt=adapter"]))
    assert [i for i, d in enumerate(ranpac) if "no pretrained weights" in d] == [len(ranpac) - 2]
