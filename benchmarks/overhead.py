"""Framework overhead and augmentation cost, measured side by side in one run.

1. Training images/s of a Replay task run through dynammo (Method.train_task -> Engine.fit, with
   the default augmentation) vs. a bare PyTorch loop on the same model, data, batch size,
   optimiser and augmentation. Target: ratio >= 0.90.
2. dynammo's throughput with the default training augmentation vs. without it. Target: >= 0.85.

MedNIST at 64 px, torchvision ResNet-18. Rounds alternate between the contenders so that machine
noise hits both; the median of each is reported.

    python benchmarks/overhead.py --data-root ../shared/data [--device cpu] [--per-class 250] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from dynammo.assembly import build_run
from dynammo.compute import resolve_device
from dynammo.configure import load_config
from dynammo.data.transforms import random_crop
from dynammo.optim import OptimSettings


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(net, images, labels, batch_size, mean, std, pad, device, settings, generator, flip=True,
              compute=None, epochs=1):
    """Plain PyTorch epochs: shuffle, slice, crop (+flip), normalise, forward, CE, backward, SGD. With
    `compute` (a compute.ComputePath) on the same autocast dtype, GradScaler and image layout as the
    engine; without it fp32 NCHW."""
    net.train()
    if compute is not None:
        compute.prepare_module(net)
    autocast = compute.autocast() if compute is not None else contextlib.nullcontext()
    channels_last = compute is not None and compute.channels_last
    scaler = torch.amp.GradScaler("cuda") if compute is not None and compute.uses_grad_scaler else None
    opt = torch.optim.SGD(net.parameters(), lr=settings.lrate, momentum=settings.opt_mom,
                          weight_decay=settings.weight_decay)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            x = images[idx].to(device)
            y = labels[idx].to(device)
            x = random_crop(x, pad, generator)
            if flip:
                coin = (torch.rand(len(y), generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
                x = torch.where(coin, x.flip(-1), x)
            x = ((x.float() / 255.0 - mean_t) / std_t).expand(-1, 3, -1, -1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    sync(device)
    return epochs * len(labels) / (time.perf_counter() - t0)


def measure(cfg, rounds: int, epochs: int = 1, no_aug: bool = True) -> dict:
    """Training images/s of task 1 of `cfg`'s run through dynammo (Method.train_task's
    Engine.fit with the default augmentation) and through bare_loop on a copy of the same model,
    data, batch size, optimiser, augmentation and compute path; with no_aug also dynammo without
    augmentation. `epochs` epochs per timed pass; medians over `rounds` alternating rounds."""
    data, scenario, engine, method = build_run(cfg, augment=True)
    device, train_tf = engine.device, engine.train_tf
    task = scenario.tasks[0]
    method.begin_task(task)
    train = method.training_set(task)
    init_state = copy.deepcopy(method.net.state_dict())
    settings = dataclasses.replace(OptimSettings.from_config(cfg), epochs=epochs)
    bare_net = copy.deepcopy(method.net)

    def through_dynammo(augment: bool) -> float:
        method.net.load_state_dict(init_state)
        method.train_mode()
        sync(device)
        t0 = time.perf_counter()
        engine.fit(method.net.parameters(), train, method.step, settings, augment=augment)
        sync(device)
        return epochs * len(train) / (time.perf_counter() - t0)

    def through_bare(seed: int) -> float:
        bare_net.load_state_dict(init_state)
        return bare_loop(bare_net, train.images, train.labels, cfg.batch_size, data.mean, data.std, train_tf.pad,
                         device, settings, torch.Generator().manual_seed(seed), flip=train_tf.flip,
                         compute=engine.compute, epochs=epochs)

    through_dynammo(True)  # warm-up (allocator, cuDNN autotune, first-call overheads)
    through_bare(1)
    fw, bare, plain = [], [], []
    for r in range(rounds):
        bare.append(through_bare(r))
        fw.append(through_dynammo(True))
        if no_aug:
            plain.append(through_dynammo(False))
    return {"bare": statistics.median(bare), "framework": statistics.median(fw),
            "no_aug": statistics.median(plain) if plain else None, "images": len(train), "epochs": epochs,
            "batch_size": cfg.batch_size, "rounds": rounds, "compute": engine.compute.describe()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-class", type=int, default=250, help="training images per class (2 classes in task 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config(["mednist_cpu", "replay"], ["seed=0",
        f"data_root={args.data_root}", f"max_train_per_class={args.per_class}", "max_test_per_class=10",
        f"batch_size={args.batch_size}", "epochs=1", "scheduler=none", f"device={args.device}", "progress=false",
        # the bare loop is fp32 NCHW: the framework on the same numerics (benchmarks/cpu_paths.py compares paths)
        "amp=false", "memory_format=contiguous"])
    r = measure(cfg, args.rounds)
    m_fw, m_bare, m_noaug = r["framework"], r["bare"], r["no_aug"]
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"MedNIST 64 px, ResNet-18, batch {args.batch_size}, {r['images']} images per epoch, {args.rounds} rounds, {name}")
    print("| measurement | images/s (median) |")
    print("|---|---|")
    print(f"| bare PyTorch loop (same model, data, batch, augmentation) | {m_bare:.1f} |")
    print(f"| dynammo Replay task (Engine.fit), default augmentation | {m_fw:.1f} |")
    print(f"| dynammo Replay task, no augmentation | {m_noaug:.1f} |")
    print(f"framework overhead ratio (dynammo / bare) = {m_fw / m_bare:.3f}  (target >= 0.90)")
    print(f"augmentation ratio (with / without)      = {m_fw / m_noaug:.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
