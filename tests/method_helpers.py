"""What the method tests share: a method built on a tiny real scenario, one task trained the way
the runner trains it, and state-dict snapshots to compare bit for bit."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from dynammo.assembly import build_run
from dynammo.configure import build_config
from dynammo.methods import METHODS

# The suite's one tiny scenario: digits at 8 px on a CIFAR ResNet-20, 3 tasks (4, 3, 3 classes),
# seconds per task on one CPU thread. Tests state only what they change ({**TINY, ...}).
DIGITS_8PX = dict(dataset="digits", backbone="resnet20", img_size=8)
QUIET = dict(progress="false", plots="false", tensorboard="false")  # no bar, no plots, no event files
TINY_SCENARIO = dict(**DIGITS_8PX, init_cls=4, increment=3, epochs=1, batch_size=16, max_train_per_class=12,
                     memory_size=30, seed=0, progress="false")
# the method tests build and train in this process, without augmentation
TINY = dict(TINY_SCENARIO, augment=False)


def cli_args(*configs: dict, **kw) -> list:
    """`key=value` command-line arguments of the configs merged (later ones win; kw last)."""
    merged = {k: v for c in (*configs, kw) for k, v in c.items()}
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


# The prompt methods (L2P, DualPrompt, CODA-Prompt) need a ViT: the configurable vit_cpu at 16 px,
# 4 px patches (16 tokens + CLS), 5 blocks so that DualPrompt's and CODA's prefix layers 0-4 exist.
VIT_TINY = dict(backbone="vit_cpu", img_size=16, vit_patch_size=4, vit_embed_dim=32, vit_depth=5, vit_heads=4)
# Method sizes that must fit the tiny scenarios (CODA-Prompt's components: a multiple of the 3 tasks,
# at most the ViT width 32; RanPAC's projection: the paper's 10,000 would make a 800 MB Gram matrix).
METHOD_TINY = {"coda_prompt": {"components": 9}, "ranpac": {"ranpac_m": 64}}


def tiny_keys(name: str) -> dict:
    """The keys a method needs on the tiny scenarios beside TINY / TINY_RUN."""
    return {**(VIT_TINY if needs_vit(name) else {}), **METHOD_TINY.get(METHODS.canonical(name), {})}


def needs_vit(name: str) -> bool:
    from dynammo.methods.prompt_base import PromptMethod

    return issubclass(METHODS.get(name), PromptMethod)


@contextmanager
def one_thread():
    """Tensor ops on one thread inside the block (tiny convolutions on 2 oversubscribed cores are
    ~20x slower with two OpenMP threads); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_method(name: str, base: dict = TINY, check: bool = True, **kw):
    """The method `name` on `base` (+ kw overrides), as the runner builds it (checks included;
    check=False skips the method's config check, to build a configuration it refuses on purpose)."""
    cfg = build_config({"method": name, **base, **tiny_keys(name), **kw})
    return build_run(cfg, device="cpu", check=check).method


def run_task(method, task) -> None:
    method.begin_task(task)
    method.train_task(task)
    method.end_task(task)


def snapshot(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The same size as a real `dynammo run` on the command line (augmentation on, as the digits protocol
# has it), shared by tests/test_method_contract.py and the methods' end-to-end tests: every stage of
# the method (epochs_finetune, epochs_bias, backbone_epochs, ...) trains for one epoch.
TINY_RUN = dict(TINY_SCENARIO, **QUIET)


def tiny_run_args(name: str, **kw) -> list:
    """`key=value` arguments of a tiny `dynammo run` of method `name` (kw: more or other keys)."""
    stage_epochs = {k: 1 for k in METHODS.get(name).options if k.startswith("epochs_") or k == "backbone_epochs"}
    return [f"{k}={v}" for k, v in {"method": name, **TINY_RUN, **tiny_keys(name), **stage_epochs, **kw}.items()]
