"""What a method costs: inference FLOPs of what the model actually executes, and parameters."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts the CUDA attention kernels but not the fused CPU one (scaled_dot_product_attention
# on CPU, as timm's ViT runs it): count it as the two matmuls it is, q k^T and (softmax) v.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


@torch.no_grad()
def count_flops(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """FLOPs (2 x multiply-accumulates) of convolutions, matmuls and attention run by fn(x)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with counter:
        fn(x)
    return int(counter.get_total_flops())


def count_params(modules: Iterable[nn.Module]) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def gflops_per_image(predict: Callable[[torch.Tensor], object], example: torch.Tensor) -> float:
    """GFLOPs per image of one inference call on a batch of one."""
    return count_flops(predict, example[:1]) / 1e9


def structure_costs(method, scenario, example: torch.Tensor) -> list:
    """Per task count T: inference GFLOPs per image and parameters of the model as it stands after
    T tasks, and the exemplar memory it may hold, with the structure built by `method.grow` (no
    training, so the numbers depend on the config only)."""
    from dynammo.methods.base import check_eval_mode

    rows = []
    # exemplars are raw uint8 images (one byte per value), not the normalised float input `example`,
    # which a transform may have expanded (a grayscale image is fed to the backbone as 3 channels)
    per_image_bytes = scenario.test.get(torch.tensor([0]))[0].numel()
    for task in scenario.tasks:
        method.grow(task)
        method.eval_mode()
        check_eval_mode(method)
        exemplars = method.memory_budget(task.end)
        rows.append({"tasks": task.id + 1, "classes": task.end, "inference_gflops": gflops_per_image(method.predict, example),
                     "params_total": count_params([method.net]), "memory_exemplars": exemplars,
                     "memory_bytes": exemplars * per_image_bytes, **method.extra_cost()})
    return rows


def format_cost_table(rows: list) -> str:
    lines = ["| tasks | classes | inference GFLOPs/image | parameters (M) | memory budget (exemplars) | memory (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['classes']} | {r['inference_gflops']:.4f} | {r['params_total'] / 1e6:.3f} | "
                     f"{r['memory_exemplars']} | {r['memory_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)
