"""Inference cost of the prompt methods on ViT-B/16 at 224 px, counted as executed (dynammo's
`count_flops` of each method's `predict`, both passes), against the closed formula of
shared/research/prompt_methods.md section 7 (patch embedding + 12 blocks: 12 n D^2 + 2 n (n + e_l) D
MACs per block, n tokens, e_l key/value prefixes at block l; FLOPs = 2 x MACs). Like the formula, the
count covers the matrix products (PyTorch's FlopCounterMode: linear layers, convolutions, attention),
not LayerNorm, softmax or GELU; the head, the key matching and CODA's sum of weighted components are
matrix products too, so they are in the count and make it slightly higher.

The paper settings: L2P M 10, Lp 5, N 5 (prompted pass at 197 + 25 tokens); DualPrompt Lg 5 at
blocks 0-1, Le 5 at blocks 2-4; CODA-Prompt Lp 8 (4 K/V) at blocks 0-4. Random weights (the count
does not depend on them), 10 tasks of 1 class of the digits data upsampled to 224 px.

    python benchmarks/prompt_flops.py [--out docs/prompt_flops.md]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dynammo.assembly import build_run
from dynammo.configure import build_config
from dynammo.cost import count_flops

D, PATCHES = 768, 196


def formula_gmacs(tokens: int, prefixes) -> float:
    """ViT-B/16 MACs of one pass: patch embedding + 12 blocks with e_l extra keys/values."""
    macs = PATCHES * D * (3 * 16 * 16)
    for extra in prefixes:
        macs += 12 * tokens * D * D + 2 * tokens * (tokens + extra) * D
    return macs / 1e9


def method_gflops(name: str) -> float:
    cfg = build_config({"method": name, "dataset": "digits", "backbone": "vit_base_patch16_224", "img_size": 224,
                        "pretrained": False, "init_cls": 1, "increment": 1, "shuffle": False, "progress": "false",
                        "max_train_per_class": 1, "max_test_per_class": 1, "normalize": "none"})
    _, scenario, engine, method = build_run(cfg, device="cpu", check=False, augment=False)
    method.net.freeze_backbone()
    for task in scenario.tasks:
        method.grow(task)
    method.eval_mode()
    x = engine.test_tf(scenario.test.get(torch.tensor([0])))
    with torch.no_grad():
        return count_flops(method.predict, x) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    plain = formula_gmacs(197, [0] * 12)
    rows = [("plain ViT-B/16 (one pass)", None, plain)]
    rows.append(("l2p", "l2p", plain + formula_gmacs(222, [0] * 12)))
    rows.append(("dualprompt", "dualprompt", plain + formula_gmacs(197, [5, 5, 5, 5, 5] + [0] * 7)))
    rows.append(("coda_prompt", "coda_prompt", plain + formula_gmacs(197, [4] * 5 + [0] * 7)))
    lines = ["| method | formula GMACs (both passes) | formula GFLOPs | counted GFLOPs | counted / formula |",
             "|---|---|---|---|---|"]
    for label, name, gmacs in rows:
        counted = method_gflops(name) if name else None
        ratio = f"{counted / (2 * gmacs):.4f}" if counted else "-"
        lines.append(f"| {label} | {gmacs:.3f} | {2 * gmacs:.2f} | {counted:.2f} | {ratio} |" if counted else
                     f"| {label} | {gmacs:.3f} | {2 * gmacs:.2f} | - | - |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
