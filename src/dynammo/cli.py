"""The `dynammo` command: run, resume, eval, list, cost, export, predict, report, sweep, pretrain."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from dynammo.errors import RunInterrupted, UserError


def _cmd_run(args) -> int:
    from dynammo.configure import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    notices: list = []
    cfg = load_config(args.config, overrides, notices=notices)
    return start_run(cfg, notices, args.out)


def start_run(cfg, notices, out) -> int:
    """Run every seed; the config notices are shown once the run can start, so a run refused for bad
    input prints only its error (shared by `dynammo run` and main.py)."""
    from dynammo.console import Console
    from dynammo.run.experiment import run_experiment

    run_experiment(cfg, Path(out) if out else None, Console(progress=cfg.progress), notices)
    return 0


def _cmd_resume(args) -> int:
    from dynammo.console import Console
    from dynammo.run.single import resume_run

    resume_run(args.run_dir, Console(progress="auto"), args.device)
    return 0


def _cmd_eval(args) -> int:
    from dynammo.console import Console
    from dynammo.run.evaluation import evaluate_checkpoint

    print_evaluation(evaluate_checkpoint(args.run_dir, args.task, Console(progress="false", quiet=True), args.device),
                     args.json)
    return 0


def print_evaluation(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    print(f"checkpoint {res['checkpoint']}: after task {res['task']}, {res['classes']} classes seen")
    line = f"accuracy {res['acc']:.2f}  mean class recall {res['mcr']:.2f}"
    if res["task_il_acc"] is not None:
        line += f"  task-IL {res['task_il_acc']:.2f}"
    if res["task_id_acc"] is not None:
        line += f"  task-id {res['task_id_acc']:.2f}"
    for name, acc in res["extra"].items():
        line += f"  {name} {acc:.2f}"
    print(line)
    print("accuracy per task: " + "  ".join(f"T{i + 1} {a:.2f}" for i, a in enumerate(res["acc_per_task"])))
    if res.get("recorded_acc") is not None:
        same = abs(res["recorded_acc"] - res["acc"]) < 1e-6
        print(f"results.json recorded {res['recorded_acc']:.2f}: {'identical' if same else 'DIFFERENT'}")


def _cmd_cost(args) -> int:
    """The cost table of a config without training: the structure is grown task by task."""
    import torch

    from dynammo.configure import load_config
    from dynammo.console import Console
    from dynammo.cost import format_cost_table, structure_costs
    from dynammo.cost_parts import cost_parts
    from dynammo.run import seeds_of

    overrides = list(args.overrides) + ["max_train_per_class=1", "max_test_per_class=1", "progress=false"]
    if args.device:
        overrides.append(f"device={args.device}")
    cfg = load_config(args.config, overrides)
    cfg["seed"] = seeds_of(cfg)[0]  # a protocol's seed list: the structure is the same for every seed
    _, scenario, engine, method = cost_parts(cfg, Console(progress="false", quiet=True))
    example = scenario.test.get(torch.tensor([0]))
    rows = structure_costs(method, scenario, engine.test_tf(example.to(engine.device)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{cfg.method} on {'+'.join(cfg.dataset) if isinstance(cfg.dataset, list) else cfg.dataset}, backbone "
          f"{cfg.backbone}, input {'x'.join(map(str, example.shape[1:]))} (uint8 exemplars); FLOPs = 2 x MACs")
    print(format_cost_table(rows))
    return 0


def _cmd_export(args) -> int:
    from dynammo.deploy import export_run

    meta = export_run(args.run_dir, args.out, args.task, force=args.force)
    print(f"wrote {args.out}: {meta['method']} after task {meta['task']}/{meta['tasks']}, {len(meta['class_names'])} "
          f"classes, input uint8 {'x'.join(map(str, meta['input_shape']))}")
    return 0


def _cmd_predict(args) -> int:
    from dynammo.deploy import predict_files, print_predictions

    print_predictions(predict_files(args.model, args.images, args.batch_size, args.max_image_pixels), args.csv)
    return 0


def _cmd_report(args) -> int:
    """Tables, figures and report.html from run directories; each run that cannot be used is one line
    on stderr (exit 2 when none can)."""
    from dynammo.reporting import discover, make_report, parse_formats, write_report

    formats = parse_formats(args.format)
    found = discover(args.run_dirs)
    for line in found.problems:
        print(line, file=sys.stderr)
    report = make_report(args.run_dirs, found)
    for note in report.notes:
        print(note)
    files = write_report(report, args.out, formats)
    runs = sum(len(s.runs) for s in report.sections)
    names = sorted({f.name for f in files if f.parent == Path(args.out)})
    n_figs = sum(1 for f in files if f.suffix == ".png")
    print(f"report of {runs} runs under {len(report.sections)} protocol(s): {args.out}/ "
          f"({', '.join(names)}; {n_figs} figures as PNG and PDF in figures/)")
    return 0


def _cmd_sweep(args) -> int:
    """Every (method, seed) of a grid as `dynammo run` subprocesses, K at a time; see dynammo/sweep/."""
    from dynammo.sweep import sweep_command

    return sweep_command(args)


def _cmd_pretrain(args) -> int:
    """Self-supervised pretraining of a backbone without labels (SimSiam, MoCo-v2); see dynammo/pretrain/."""
    from dynammo.pretrain.command import pretrain_command

    return pretrain_command(args)


def key_line(key, opt) -> str:
    """One key of `dynammo list --keys`: type, default, valid range or choices, paper value, help."""
    valid = "|".join(map(str, opt.choices)) if opt.choices else opt.range_text()
    from dynammo.config import NOT_DECLARED

    paper = f" [paper: {opt.faithful}]" if opt.faithful is not NOT_DECLARED else ""
    return f"  {key:<22} {opt.kind:<12} {opt.default!r:<12} {valid:<18} {opt.help}{paper}"


def _cmd_list(args) -> int:
    from dynammo.config import OPTIONS
    from dynammo.data.datasets import DATASETS, LAYOUTS
    from dynammo.methods import METHODS
    from dynammo.models.backbones import BACKBONES
    from dynammo.protocols import describe, methods_tuned_for, protocol_names, protocol_path

    if args.keys:
        print("config keys (type, default, valid values, help):")
        for key, opt in OPTIONS.items():
            print(key_line(key, opt))
        for name in METHODS.names():
            opts = METHODS.get(name).options
            if opts:
                print(f"keys of method {name}:")
                for key, opt in opts.items():
                    print(key_line(key, opt))
        from dynammo.pretrain.config import GENERAL_KEYS, PRETRAIN_OPTIONS

        print(f"keys of dynammo pretrain (besides {', '.join(k for k in GENERAL_KEYS if k not in PRETRAIN_OPTIONS)}):")
        for key, opt in PRETRAIN_OPTIONS.items():
            print(key_line(key, opt))
        return 0
    print("protocols (dynammo run -c PROTOCOL -c METHOD; methods tuned for it in brackets):")
    for name in protocol_names():
        tuned = methods_tuned_for(name)
        tuned_txt = "all methods" if len(tuned) == len(METHODS.names()) else ", ".join(tuned)
        print(f"  {name:<15} {describe(protocol_path(name))} [{tuned_txt}]")
    print("methods:")
    for name in METHODS.names():
        cls = METHODS.get(name)
        aliases = METHODS.aliases_of(name)
        alias_txt = f" (also: {', '.join(aliases)})" if aliases else ""
        print(f"  {name:<12} {cls.summary}{alias_txt}")
    medmnist = [n for n in DATASETS.names() if "mnist" in n and n != "mednist"]
    print("datasets (name (aliases): what it reads under data_root):")
    for name in DATASETS.names():
        if name not in medmnist:
            aliases = DATASETS.aliases_of(name)
            alias_txt = f" ({', '.join(aliases)})" if aliases else ""
            print(f"  {name}{alias_txt}: {LAYOUTS[name]}")
    print(f"  MedMNIST: {', '.join(n for n in medmnist if '_' not in n)} (add _64, _128 or _224 for larger sizes): "
          "data_root/<name>.npz (downloaded when missing)")
    print("backbones:")
    print("  " + ", ".join(BACKBONES.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynammo", description="Class-incremental learning for medical imaging.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train a method task after task and write a run directory")
    run.add_argument("-c", "--config", action="append", default=[],
                     help="a protocol name, a method name or a YAML file; repeat it: -c PROTOCOL -c METHOD "
                          "(default: -c digits -c dynammo; see `dynammo list`)")
    run.add_argument("--out", help="run directory (default: runs/<method>_<dataset>_<time>)")
    run.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: auto)")
    run.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    run.set_defaults(func=_cmd_run)
    resume = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    resume.add_argument("run_dir", help="the run directory of the interrupted run")
    resume.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the run's)")
    resume.set_defaults(func=_cmd_resume)
    evaluate = sub.add_parser("eval", help="recompute a run's metrics from a checkpoint")
    evaluate.add_argument("run_dir", help="a run directory written by `dynammo run`")
    evaluate.add_argument("--task", type=int, help="the checkpoint after this task (1-based; default: the last)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the run's)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(func=_cmd_eval)
    cost = sub.add_parser("cost", help="inference GFLOPs, parameters and memory per task count, without training")
    cost.add_argument("-c", "--config", action="append", default=[],
                      help="a protocol name, a method name or a YAML file; repeat it: -c PROTOCOL -c METHOD")
    cost.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: auto)")
    cost.add_argument("--json", action="store_true", help="print the rows as JSON")
    cost.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    cost.set_defaults(func=_cmd_cost)
    export = sub.add_parser("export", help="write a run's trained model as one self-contained file")
    export.add_argument("run_dir", help="a run directory written by `dynammo run`")
    export.add_argument("--out", required=True, help="the model file to write (e.g. model.pt)")
    export.add_argument("--task", type=int, help="use the checkpoint after this task (1-based; default: the last)")
    export.add_argument("--force", action="store_true", help="replace --out even when it is not an earlier export")
    export.set_defaults(func=_cmd_export)
    predict = sub.add_parser("predict", help="classify image files with an exported model")
    predict.add_argument("model", help="a file written by `dynammo export`")
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--csv", action="store_true", help="print CSV (image,class,class_id,confidence)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict.add_argument("--max-image-pixels", type=int, help="refuse larger images (default: PIL's "
                                                                "decompression-bomb limit, 89,478,485)")
    predict.set_defaults(func=_cmd_predict)
    report = sub.add_parser("report", help="tables (md, csv, tex), figures and one HTML page from run directories, "
                                           "mean ± sample std over seeds, one section per protocol")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories, seed-list folders or folders holding them (searched recursively)")
    report.add_argument("--out", default="report", help="the report folder (default: ./report; an earlier report "
                                                        "there is replaced)")
    report.add_argument("--format", default="md,csv,tex,html",
                        help="comma-separated: md (report.md), csv (report.csv, per_task.csv), tex (report.tex), "
                             "html (report.html); default: all four. Figures (PNG, PDF) and report.json always")
    report.set_defaults(func=_cmd_report)
    sweep = sub.add_parser("sweep", help="run every method x seed of a grid under one protocol, K at a time, "
                                         "skipping finished runs and resuming interrupted ones; then the report")
    sweep.add_argument("-c", "--config", action="append", default=[],
                       help="a protocol name or a YAML file, repeatable (default: -c digits); methods come from "
                            "--methods")
    sweep.add_argument("--methods", nargs="*", default=[], metavar="METHOD", help="the methods to run (required)")
    sweep.add_argument("--seeds", nargs="*", default=[], metavar="SEED", help="default: the protocol's seeds")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1); each gets cores // jobs "
                                                            "CPU threads")
    sweep.add_argument("--devices", help="GPU ids, e.g. 0,1: the job slots take them round-robin "
                                         "(CUDA_VISIBLE_DEVICES); more jobs than GPUs share them")
    where = sweep.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="the sweep folder: DIR/<method>/seed<S>/ per run, DIR/report/")
    where.add_argument("--state", metavar="RUN_DIR", help="only print complete, resume or fresh: whether a sweep "
                                                          "skips, resumes or starts that run directory")
    sweep.add_argument("--emit-slurm", metavar="FILE", help="write a SLURM job-array script instead of running "
                                                            "(one array task per run, --jobs at a time)")
    sweep.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                       help="with --emit-slurm: one more #SBATCH line, e.g. --slurm-option=--partition=gpu "
                            "(repeatable)")
    sweep.add_argument("--gpus-per-task", type=int, help="with --emit-slurm: #SBATCH --gpus-per-task=N")
    sweep.add_argument("overrides", nargs="*", help="key=value: a general key goes to every method, a method's "
                                                    "key to the swept methods that declare it")
    sweep.set_defaults(func=_cmd_sweep)
    pretrain = sub.add_parser("pretrain", help="pretrain a backbone without labels (SimSiam, MoCo-v2) for "
                                               "`pretrained: RUN/backbone.pt`")
    pretrain.add_argument("-c", "--config", action="append", default=[],
                          help="a protocol name (its data and backbone keys) or a YAML file; repeatable")
    pretrain.add_argument("--out", help="run directory (default: runs/pretrain_<ssl_method>_<data>_<time>)")
    pretrain.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: auto)")
    pretrain.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted pretraining exactly where it "
                                                                "stopped")
    pretrain.add_argument("overrides", nargs="*", help="key=value overrides (ssl_method=moco_v2, epochs=50, ...; "
                                                       "see `dynammo list --keys`)")
    pretrain.set_defaults(func=_cmd_pretrain)
    lst = sub.add_parser("list", help="show protocols, methods, datasets and backbones")
    lst.add_argument("--keys", action="store_true", help="list every config key with its type and default")
    lst.set_defaults(func=_cmd_list)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """`parser.parse_args`, except that `key=value` overrides may come anywhere on the line
    (`dynammo run method=replay --device cpu epochs=1`), for every command that takes them; they keep
    their order (a later one wins). Anything else unrecognised is still argparse's error (exit 2)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [t for t in extra if not t.startswith("-") and "=" in t]
    rest = [t for t in extra if t not in overrides]
    if overrides and hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + overrides
    else:
        rest = extra
    if rest:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        owner = subparsers[0].choices.get(args.command, parser) if subparsers and args.command else parser
        owner.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except RunInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops at the same batch: one line
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # torchrun: leave the process group before exiting (else gloo may abort)
            from dynammo.distributed import close_world

            close_world()


if __name__ == "__main__":
    raise SystemExit(main())
