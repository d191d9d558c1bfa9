"""What every prompt method (L2P, DualPrompt, CODA-Prompt) must do, whatever its prompts: two ViT
passes per image (their own tests check the rest method by method)."""
from __future__ import annotations

import pytest
import torch

from dynammo.methods import METHODS
from dynammo.methods.prompt_base import PromptMethod

import method_helpers

PROMPT_METHODS = [name for name in METHODS.names() if issubclass(METHODS.get(name), PromptMethod)]


def test_the_three_prompt_methods_are_registered():
    assert PROMPT_METHODS == ["coda_prompt", "dualprompt", "l2p"]


@pytest.fixture(params=PROMPT_METHODS)
def grown(request):
    m = method_helpers.make_method(request.param, backbone_epochs=0)
    m.net.freeze_backbone()
    for task in m.scenario.tasks:
        m.grow(task)
    m.eval_mode()
    return m


def test_patch_embedding_runs_exactly_twice_per_predict(grown):
    calls = []
    handle = grown.net.vit.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        grown.predict(torch.randn(4, 3, 16, 16))
    finally:
        handle.remove()
    assert len(calls) == 2  # the query pass and the prompted pass

