"""Step 5, latency: DynaMMo against ACL at T tasks, measured inference latency per image beside the
counted GFLOPs (benchmarks/efficiency.py's build)."""
from __future__ import annotations

import statistics
import time
import traceback
from typing import List

import torch

from gpu_check_steps.common import Check, now, one_line, sync


def step_latency(check: Check, deadline: float) -> List[dict]:
    from dynammo.cost import gflops_per_image
    from efficiency import build

    s = check.s
    t_max = max(s.latency_tasks)
    methods = {n: build(n, t_max, s.latency_img_size, s.device) for n in ("acl", "dynammo")}
    device = check.device
    rows, grown = [], {n: 0 for n in methods}
    for t in sorted(s.latency_tasks):
        row = {"name": f"T={t}", "tasks": t}
        if deadline - now() < 3:
            rows.append({**row, "status": "skipped", "reason": "budget: the step's time slice ran out"})
            continue
        try:
            for n, (m, tasks) in methods.items():
                while grown[n] < t:
                    m.grow(tasks[grown[n]])
                    grown[n] += 1
                m.eval_mode()
                compute = m.engine.compute
                x = torch.randn(s.latency_batch, 3, s.latency_img_size, s.latency_img_size, device=device)
                if compute.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                row[f"{n}_gflops"] = round(gflops_per_image(m.predict, x), 4)
                row[f"{n}_ms_batch1"] = round(1e3 * time_calls(m, x[:1], s.latency_calls, device), 3)
                row[f"{n}_ms_per_image_batch{s.latency_batch}"] = round(
                    1e3 * time_calls(m, x, max(1, s.latency_calls // 3), device) / len(x), 4)
                row["compute"] = compute.describe()
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row.update(status="failed", reason=one_line(exc))
        print(f"[gpu_check]   latency T={t}: {row['status']}", flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def time_calls(method, x: torch.Tensor, calls: int, device: torch.device) -> float:
    """Median seconds of method.predict(x) under its compute path, after warm-up calls."""
    times = []
    with method.engine.autocast():
        for i in range(calls + 3):
            sync(device)
            t0 = time.perf_counter()
            method.predict(x)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)
