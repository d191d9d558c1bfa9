"""The GPU check: one command, prepared for the day a GPU is lent (issue 25), that writes one JSON and
one Markdown table to --out:

1. methods: every registered method (the registry is read at run time, so a method added later is
   included) runs a tiny protocol (digits, few epochs) on the device with the automatic compute path,
   then again in fp32 (amp=false); a crash, a NaN, a run that put nothing on the GPU or an accuracy
   matrix further from the fp32 run's than the tolerance is a failure with the method named. The
   runs are real `dynammo run`s inside worker processes: a worker that dies (a CUDA error poisons
   its context) is replaced for the methods left, so one failure stops nothing else.
2. export: DynaMMo's runs exported with `dynammo export`; `dynammo predict` of the file and the
   exported program moved to the device agree with the framework's predictions on the device.
3. speed: training images/s of dynammo against a bare PyTorch loop on the same model, data and compute
   path, side by side in one process (benchmarks/overhead.py's measure), per backbone and image size.
4. loader: the file-backed 224 px loader alone, with the model, and the model on the same images held
   in memory: whether the GPU waits for data.
5. latency: DynaMMo against ACL at T = 1, 5, 10 tasks: measured inference latency per image beside the
   counted GFLOPs (benchmarks/efficiency.py's build, dynammo.cost's counter).

Every step (and every row inside one) runs in try/except: a failure is recorded with its one-line
reason and the next steps still run. The JSON and the table are rewritten after every step. The time
budget (--budget-s) is shared out over the steps left; what no longer fits is recorded as skipped.

    python benchmarks/gpu_check.py --out DIR [--budget-s 540]       # on a GPU (device cuda)
    python benchmarks/gpu_check.py --out DIR --dry-run              # CPU, tiny settings (CI runs this)

docs/gpu.md says how to run it on a lent GPU machine and holds its output.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "src"):  # the steps, the sibling benchmarks; the package even uninstalled
    if str(_path) not in sys.path:
        sys.path.insert(0 if _path == HERE else len(sys.path), str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from the network

import torch  # noqa: E402

from gpu_check_steps.common import STEP_NAMES, Check, Settings, Step  # noqa: E402
from gpu_check_steps.export import step_export  # noqa: E402
from gpu_check_steps.latency import step_latency  # noqa: E402
from gpu_check_steps.loader import step_loader  # noqa: E402
from gpu_check_steps.methods import methods_worker, step_methods  # noqa: E402
from gpu_check_steps.speed import step_speed  # noqa: E402


STEPS = [
    Step("methods", "every registered method on the device, auto compute path against fp32", 60, step_methods, 20),
    Step("export", "dynammo export on a run trained on the device; predict agrees with the framework", 10, step_export, 20),
    Step("speed", "training images/s, dynammo against a bare PyTorch loop, same model, data and compute path",
         18, step_speed, 15),
    Step("loader", "file-backed loader: alone, with the model, against in-memory images", 8, step_loader, 10),
    Step("latency", "DynaMMo against ACL: inference latency per image beside the counted GFLOPs", 8, step_latency, 8),
]


def parse_args(argv=None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny settings (what CI runs)")
    ap.add_argument("--budget-s", type=float, help="overall time budget in seconds (default 540; dry run 300)")
    ap.add_argument("--device", help="default cuda (dry run: cpu)")
    ap.add_argument("--methods", nargs="+", help="only these methods (default: every registered one)")
    ap.add_argument("--steps", nargs="+", choices=STEP_NAMES, help="only these steps (default: all)")
    ap.add_argument("--speed-models", nargs="+", help="backbone@size:batch:epochs, e.g. resnet18@224:64:2")
    ap.add_argument("--fail", choices=STEP_NAMES, help="make this step fail on purpose (checks that the rest still run)")
    ap.add_argument("--data-root", help="folder holding mednist.tar.gz (default: looked for in ../shared/data)")
    ap.add_argument("--tolerance", type=float, help="accuracy points: mean |auto - fp32| over the accuracy matrix "
                                                    "(default 10)")
    ap.add_argument("--methods-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.methods_worker:
        return args
    if not args.out:
        ap.error("--out DIR is required")
    given = {k: v for k, v in {"budget_s": args.budget_s, "device": args.device, "methods": args.methods,
                               "steps": args.steps, "speed_models": args.speed_models, "fail": args.fail,
                               "data_root": args.data_root, "tolerance": args.tolerance}.items() if v is not None}
    return Settings.dry(args.out, **given) if args.dry_run else Settings(out=args.out, **given)


def main(argv=None) -> int:
    parsed = parse_args(argv)
    if isinstance(parsed, argparse.Namespace):  # a worker of the methods step
        return methods_worker(Path(parsed.methods_worker))
    if parsed.dry_run:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    check = Check(parsed)
    print(f"[gpu_check] {check.record['mode']} on {check.record['environment'].get('gpu') or parsed.device}, "
          f"budget {parsed.budget_s:g} s, writing {check.out}", flush=True)
    record = check.run(STEPS)
    print(f"[gpu_check] done in {record['elapsed_s']:g} s: {record['summary']}; {check.out / 'gpu_check.md'}", flush=True)
    return 0 if record["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
