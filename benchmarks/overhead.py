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
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from dynammo.assembly import build_run
from dynammo.config import load_config
from dynammo.data.transforms import random_crop
from dynammo.engine import OptimSettings


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(net, images, labels, batch_size, mean, std, pad, device, settings, generator):
    """A plain PyTorch epoch: shuffle, slice, crop+flip, normalise, forward, CE, backward, SGD."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=settings.lrate, momentum=settings.opt_mom,
                          weight_decay=settings.weight_decay)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    order = torch.randperm(len(labels), generator=generator)
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        x = images[idx].to(device)
        y = labels[idx].to(device)
        x = random_crop(x, pad, generator)
        flip = (torch.rand(len(y), generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        x = ((x.float() / 255.0 - mean_t) / std_t).expand(-1, 3, -1, -1)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return len(labels) / (time.perf_counter() - t0)


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
    data, scenario, engine, method = build_run(cfg, augment=True)
    device = engine.device
    train_tf = engine.train_tf
    task = scenario.tasks[0]
    method.begin_task(task)
    train = method.training_set(task)
    init_state = copy.deepcopy(method.net.state_dict())
    settings = OptimSettings.from_config(cfg)
    bare_net = copy.deepcopy(method.net)
    images = train.images
    labels = train.labels

    def through_dynammo(augment: bool) -> float:
        method.net.load_state_dict(init_state)
        method.train_mode()
        sync(device)
        t0 = time.perf_counter()
        engine.fit(method.net.parameters(), train, method.step, settings, augment=augment)
        sync(device)
        return len(train) / (time.perf_counter() - t0)

    # warm-up (allocator, cuDNN autotune, first-call overheads)
    through_dynammo(True)
    bare_loop(bare_net, images, labels, args.batch_size, data.mean, data.std, train_tf.pad, device, settings,
              torch.Generator().manual_seed(1))
    fw, bare, no_aug = [], [], []
    for r in range(args.rounds):
        bare_net.load_state_dict(init_state)
        bare.append(bare_loop(bare_net, images, labels, args.batch_size, data.mean, data.std, train_tf.pad, device,
                              settings, torch.Generator().manual_seed(r)))
        fw.append(through_dynammo(True))
        no_aug.append(through_dynammo(False))
    m_fw, m_bare, m_noaug = (statistics.median(v) for v in (fw, bare, no_aug))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"MedNIST 64 px, ResNet-18, batch {args.batch_size}, {len(train)} images per epoch, {args.rounds} rounds, {name}")
    print("| measurement | images/s (median) |")
    print("|---|---|")
    print(f"| bare PyTorch loop (same model, data, batch, augmentation) | {m_bare:.1f} |")
    print(f"| dynammo Replay task (Engine.fit), default augmentation | {m_fw:.1f} |")
    print(f"| dynammo Replay task, no augmentation | {m_noaug:.1f} |")
    print(f"framework overhead ratio (dynammo / bare) = {m_fw / m_bare:.3f}  (target >= 0.90)")
    print(f"augmentation ratio (with / without)      = {m_fw / m_noaug:.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
