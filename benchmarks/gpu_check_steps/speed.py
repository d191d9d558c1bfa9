"""Step 3, speed: training images/s of dynammo against a bare PyTorch loop (benchmarks/overhead.py's
measure), per backbone and image size."""
from __future__ import annotations

import traceback
from typing import List

import torch

from gpu_check_steps.common import Check, now, one_line


def parse_model(spec: str) -> tuple:
    """backbone@size:batch:epochs -> (backbone, size, batch, epochs)."""
    backbone, rest = spec.split("@")
    size, batch, epochs = (rest.split(":") + ["64", "1"])[:3]
    return backbone, int(size), int(batch), int(epochs)


def step_speed(check: Check, deadline: float) -> List[dict]:
    from dynammo.configure import load_config
    from overhead import measure

    s = check.s
    specs = list(s.speed_models)
    rows = []
    for i, spec in enumerate(specs):
        row = {"name": spec}
        left = deadline - now()
        if left < 10:
            row.update(status="skipped", reason="budget: the step's time slice ran out")
            rows.append(row)
            continue
        try:
            backbone, size, batch, epochs = parse_model(spec)
            row.update(backbone=backbone, img_size=size)
            if backbone.startswith("vit") and check.device.type == "cuda":
                free = torch.cuda.mem_get_info(check.device)[0] / 2**30
                if free < s.vit_min_free_gib:
                    row.update(status="skipped", reason=f"memory: {free:.0f} GiB free, needs {s.vit_min_free_gib:g}")
                    rows.append(row)
                    continue
            # task 1 = all 10 digits classes, upsampled to the size; Replay's step (a plain CE step)
            cfg = load_config(["digits", "replay"], [
                f"backbone={backbone}", f"img_size={size}", "init_cls=10", "increment=1", f"batch_size={batch}",
                "scheduler=none", f"device={s.device}", "progress=false", "seed=0", "amp=auto", "memory_format=auto",
                *([f"max_train_per_class={s.train_per_class}"] if s.train_per_class else [])])
            r = measure(cfg, s.speed_rounds, epochs=epochs, no_aug=False)
            row.update(status="ok", batch_size=batch, images=r["images"], epochs=r["epochs"], rounds=r["rounds"],
                       compute=r["compute"], framework_img_s=round(r["framework"], 1), bare_img_s=round(r["bare"], 1),
                       ratio=round(r["framework"] / r["bare"], 3))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            msg = one_line(exc)
            oom = "out of memory" in msg.lower()
            row.update(status="skipped" if oom else "failed", reason=("memory: " if oom else "") + msg)
        finally:
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_check]   speed {spec}: {row['status']} "
              + (f"{row['framework_img_s']} vs {row['bare_img_s']} img/s" if row["status"] == "ok" else row["reason"]),
              flush=True)
        rows.append(row)
    return rows
