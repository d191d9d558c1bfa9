"""Step 4, loader: the file-backed loader alone, with the model, and the model on the same images held
in memory: whether the GPU waits for data."""
from __future__ import annotations

import os
import statistics
import threading
import traceback
from pathlib import Path
from typing import List, Optional

import torch

from gpu_check_steps.common import ROOT, Check, Settings, now, one_line, sync


def find_mednist(s: Settings) -> Optional[Path]:
    """The folder holding mednist.tar.gz: --data-root, $DYNAMMO_SHARED_DATA, /work/shared/data, ../shared/data."""
    cands = [s.data_root, os.environ.get("DYNAMMO_SHARED_DATA"), "/work/shared/data", str(ROOT.parent / "shared" / "data")]
    for c in cands:
        if c and (Path(c) / "mednist.tar.gz").is_file():
            return Path(c)
    return None


class UtilisationSampler:
    """The GPU's utilisation (torch.cuda.utilization, through NVML) sampled every 0.2 s in a thread."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(0.2):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML: no utilisation figure
                return

    def __enter__(self):
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> Optional[float]:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def step_loader(check: Check, deadline: float) -> List[dict]:
    from dynammo.assembly import build_run
    from dynammo.configure import load_config
    from dynammo.data.loader import iterate_batches
    from dynammo.optim import OptimSettings
    from loader_speed import write_images

    s = check.s
    mednist = find_mednist(s)
    if mednist is not None:
        classes = 6
        source = f"MedNIST ({mednist / 'mednist.tar.gz'}), JPEGs decoded per batch"
        data_keys = ["dataset=mednist", f"data_root={mednist}", f"max_train_per_class={max(1, s.loader_images // 6)}"]
    else:
        classes = 4
        root = check.work / "jpegs"
        write_images(root, s.loader_images, (500, 375), classes=classes)
        source = (f"synthetic: {s.loader_images} generated 500x375 JPEGs in a temporary ImageFolder layout "
                  "(MedNIST not found)")
        data_keys = ["dataset=folder", f"data_root={root}", "test_fraction=0.05"]
    workers = min(s.loader_workers, os.cpu_count() or 1)
    cfg = load_config(None, ["method=replay", "backbone=resnet18", f"img_size={s.loader_img_size}", "in_memory=false",
                             "normalize=imagenet", f"init_cls={classes}", "increment=1", f"num_workers={workers}",
                             f"batch_size={s.loader_batch}", "epochs=1", "scheduler=none", f"device={s.device}",
                             "progress=false", "seed=0", "memory_size=10", "max_test_per_class=2", *data_keys])
    _, scenario, engine, method = build_run(cfg, augment=True)
    task = scenario.tasks[0]
    method.begin_task(task)
    files = method.training_set(task)
    settings = OptimSettings.from_config(cfg)
    device = engine.device

    def loader_only() -> float:
        gen = torch.Generator().manual_seed(0)
        sync(device)
        t0, n = now(), 0
        for raw, _, _ in iterate_batches(files, s.loader_batch, shuffle=True, generator=gen, num_workers=workers):
            engine.train_tf(raw.to(device, non_blocking=True), gen)  # augmentation on the device, as training does
            n += len(raw)
        sync(device)
        return n / (now() - t0)

    def with_model(data) -> tuple:
        method.train_mode()
        with UtilisationSampler(device) as util:
            sync(device)
            t0 = now()
            engine.fit(method.net.parameters(), data, method.step, settings)
            sync(device)
            rate = len(data) / (now() - t0)
        return rate, util.mean()

    rows = [{"name": "source", "status": "ok", "source": source, "images": len(files), "workers": workers,
             "img_size": s.loader_img_size, "batch_size": s.loader_batch, "compute": engine.compute.describe()}]
    measures = [("loader alone (decode, resize, to device, augment on device)", loader_only),
                ("loader + ResNet-18 training (files decoded per batch)", lambda: with_model(files))]
    in_memory = {}
    for name, fn in measures + [("ResNet-18 training on the same images held in memory",
                                 lambda: with_model(in_memory.setdefault("set", files.materialize())))]:
        row = {"name": name}
        if deadline - now() < 5:
            row.update(status="skipped", reason="budget: the step's time slice ran out")
        else:
            try:
                fn()  # warm-up (workers, cuDNN autotune)
                out = fn()
                rate, util = out if isinstance(out, tuple) else (out, None)
                row.update(status="ok", img_s=round(rate, 1), gpu_util_pct=util)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row.update(status="failed", reason=one_line(exc))
        print(f"[gpu_check]   loader: {name}: {row.get('img_s', row.get('reason'))}", flush=True)
        rows.append(row)
    files_rate, memory_rate = rows[2].get("img_s"), rows[3].get("img_s")
    if files_rate and memory_rate:
        ratio = files_rate / memory_rate
        rows[0]["files_over_memory"] = round(ratio, 3)
        rows[0]["gpu_waits_for_data"] = ratio < 0.9  # training from files >10% slower than from memory
    return rows
