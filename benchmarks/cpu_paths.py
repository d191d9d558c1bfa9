"""Training images/s of the framework's fit path under each compute path (compute.py), side by side
in one run: fp32 contiguous (the path of earlier versions), fp32 channels-last, bf16 autocast on
NCHW, bf16 autocast on channels-last images and weights (`ComputePath.prepare_module`, which
build_run and Engine.fit call), and `auto` (what a run on this machine picks).

Each contender is a Replay run built the way `dynammo run` builds it (assembly.build_run) with its
own `amp` / `memory_format`, trained for one epoch of its first task through Engine.fit. Two
settings: a CIFAR ResNet-32 at 32 px and a torchvision ResNet-18 at 64 px, on MedNIST (or the
bundled digits with --dataset digits). Rounds alternate between the contenders so that machine
noise hits all of them. The ratio to fp32 contiguous is of the best round of each (noise from other
processes on shared cores only ever slows a round down, as timeit's minimum assumes); medians and
every round are printed too, with the load average before and after.

    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/cpu_paths.py --data-root ../shared/data [--rounds 3]
        [--backbones resnet32:32,resnet18:64] [--batch-size 32] [--dataset digits]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from dynammo.assembly import build_run
from dynammo.configure import load_config
from dynammo.optim import OptimSettings

# (label, config keys)
CONTENDERS = [
    ("fp32, contiguous (today)", ["amp=false", "memory_format=contiguous"]),
    ("fp32, channels_last", ["amp=false", "memory_format=channels_last"]),
    ("bf16 autocast, contiguous", ["amp=true", "memory_format=contiguous"]),
    ("bf16 autocast, channels_last", ["amp=true", "memory_format=channels_last"]),
    ("auto", ["amp=auto", "memory_format=auto"]),
]
SETTINGS = [("resnet32", 32), ("resnet18", 64)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One Replay run of the first task, ready to train an epoch from the same initial weights."""

    def __init__(self, cfg):
        self.method = build_run(cfg).method
        self.engine = self.method.engine
        task = self.method.scenario.tasks[0]
        self.engine.begin_task("task 1")
        self.method.begin_task(task)
        self.train = self.method.training_set(task)
        self.settings = OptimSettings.from_config(cfg)
        self.init_state = copy.deepcopy(self.method.net.state_dict())

    def epoch(self) -> float:
        """Training images/s of one epoch through Engine.fit."""
        self.method.net.load_state_dict(self.init_state)  # copies into the parameters: their layout stays
        self.method.train_mode()
        sync(self.engine.device)
        t0 = time.perf_counter()
        self.engine.fit(self.method.net.parameters(), self.train, self.method.step, self.settings)
        sync(self.engine.device)
        return len(self.train) / (time.perf_counter() - t0)


def measure(args, backbone: str, size: int) -> list:
    base = ["seed=0", f"data_root={args.data_root}", f"max_train_per_class={args.per_class}", "max_test_per_class=10",
            f"backbone={backbone}", f"img_size={size}", f"batch_size={args.batch_size}", "epochs=1",
            "scheduler=none", f"device={args.device}", "progress=false"]
    protocol = ["mednist_cpu", "replay"] if args.dataset == "mednist" else ["digits", "replay"]
    runs = [Contender(load_config(protocol, base + keys)) for _, keys in CONTENDERS]
    for run in runs:  # warm-up: allocator, oneDNN primitive caches, first-call overheads
        run.epoch()
    speeds = [[] for _ in runs]
    for _ in range(args.rounds):
        for run, out in zip(runs, speeds):
            out.append(run.epoch())
    return [(label, run.engine.compute.describe(), s) for (label, _), run, s in zip(CONTENDERS, runs, speeds)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--dataset", default="mednist", choices=("mednist", "digits"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-class", type=int, default=200, help="training images per class (2 classes in task 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbones", default=",".join(f"{b}:{s}" for b, s in SETTINGS),
                    help="backbone:img_size pairs, comma-separated")
    args = ap.parse_args()
    where = f"CPU ({torch.get_num_threads()} threads)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{args.dataset}, batch {args.batch_size}, {2 * args.per_class} images per epoch, {args.rounds} rounds, "
          f"{where}, torch {torch.__version__}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for backbone, size in (item.split(":") for item in args.backbones.split(",")):
        rows = measure(args, backbone, int(size))
        today = max(rows[0][2])
        print(f"\n{backbone} at {size} px")
        print("| path | what the run logs | images/s (best round) | x fp32 contiguous | median | rounds |")
        print("|---|---|---|---|---|---|")
        for label, described, speeds in rows:
            print(f"| {label} | {described} | {max(speeds):.1f} | **{max(speeds) / today:.2f}** | "
                  f"{statistics.median(speeds):.1f} | {', '.join(f'{s:.0f}' for s in speeds)} |")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
