"""Inference cost of ACL vs DynaMMo (and DER) by number of tasks (ResNet-18, 224 px), measured side by side.

GFLOPs per image are counted with torch's FlopCounterMode on each method's real `predict` (what
the model executes), with the structure grown task by task exactly as training builds it
(`Method.grow`); wall-clock images/s are timed at the largest task count, alternating the two.

    python benchmarks/efficiency.py [--tasks 10] [--img-size 224] [--time-images 16] [--plot docs/img/efficiency_gflops.png]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dynammo.assembly import build_run
from dynammo.compute import resolve_device
from dynammo.configure import load_config
from dynammo.cost import count_params, gflops_per_image


def build(name, tasks, img_size, device):
    adapter_keys = ["backbone_epochs=0"] if name in ("acl", "dynammo") else []
    cfg = load_config(None, [f"method={name}", "dataset=digits", "backbone=resnet18", f"img_size={img_size}",
                             "init_cls=1", "increment=1", "progress=false", *adapter_keys,
                             f"device={device}", "memory_size=10", "max_test_per_class=2", "seed=0"])
    _, scenario, _, method = build_run(cfg, device=device, check=False, augment=False)
    return method, scenario.tasks[:tasks]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--time-images", type=int, default=16, help="images per timed batch (0: skip timing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    methods = {n: build(n, args.tasks, args.img_size, args.device) for n in ("acl", "dynammo", "der")}
    x = torch.randn(1, 3, args.img_size, args.img_size, device=resolve_device(args.device))
    rows = []
    for t in range(args.tasks):
        row = {"T": t + 1}
        for name, (m, tasks) in methods.items():
            m.grow(tasks[t])
            m.eval_mode()
            row[name] = gflops_per_image(m.predict, x)
            row[name + "_params"] = count_params([m.net]) / 1e6
        rows.append(row)
    print(f"ResNet-18 at {args.img_size} px, inference GFLOPs per image (FLOPs = 2 x MACs)")
    print("| tasks | ACL GFLOPs | DynaMMo GFLOPs | DER GFLOPs | ACL / DynaMMo | ACL params (M) | DynaMMo params (M) "
          "| DER params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['acl']:.3f} | {r['dynammo']:.3f} | {r['der']:.3f} | {r['acl'] / r['dynammo']:.2f} | "
              f"{r['acl_params']:.2f} | {r['dynammo_params']:.2f} | {r['der_params']:.2f} |")
    first, last = rows[0], rows[-1]
    print(f"DynaMMo T={last['T']} vs T=1: {100 * (last['dynammo'] / first['dynammo'] - 1):+.2f}% (target within 1%)")
    print(f"ACL / DynaMMo FLOPs at T={last['T']}: {last['acl'] / last['dynammo']:.2f} (target >= 9)")

    if args.time_images:
        batch = torch.randn(args.time_images, 3, args.img_size, args.img_size, device=x.device)
        timed = {n: methods[n] for n in ("acl", "dynammo")}
        speed = {n: [] for n in timed}
        with torch.no_grad():
            for n, (m, _) in timed.items():
                m.predict(batch[:2])  # warm-up
            for _ in range(args.rounds):
                for n, (m, _) in timed.items():
                    if x.device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    m.predict(batch)
                    if x.device.type == "cuda":
                        torch.cuda.synchronize()
                    speed[n].append(len(batch) / (time.perf_counter() - t0))
        acl, dyn = statistics.median(speed["acl"]), statistics.median(speed["dynammo"])
        print(f"wall-clock at T={last['T']} on {args.device} ({torch.get_num_threads()} threads): ACL {acl:.2f} images/s, "
              f"DynaMMo {dyn:.2f} images/s, DynaMMo / ACL = {dyn / acl:.2f} (target >= 7)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ts = [r["T"] for r in rows]
        ax.plot(ts, [r["acl"] for r in rows], "o-", label="ACL (one path per task)")
        ax.plot(ts, [r["dynammo"] for r in rows], "s-", label="DynaMMo (merged: one path)")
        ax.plot(ts, [r["der"] for r in rows], "^--", label="DER (one backbone per task)")
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("inference GFLOPs / image")
        ax.set_xticks(ts)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"ResNet-18, {args.img_size} px", fontsize=10)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
