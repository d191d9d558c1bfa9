"""The keys of `dynammo pretrain` and how its config is composed.

    dynammo pretrain [-c PROTOCOL | -c FILE.yaml ...] [--out DIR] [key=value ...]

A pretraining config holds the framework's data, backbone, optimiser and run keys (declared in
config.py, listed in GENERAL_KEYS) and the self-supervised keys declared here (PRETRAIN_OPTIONS,
with their help text; `dynammo list --keys` prints them). Some general keys get defaults of their
own here (a cosine schedule, weight decay 1e-4, a learning rate scaled with the batch), as the
SimSiam and MoCo-v2 papers train.

`-c PROTOCOL` takes only the data and backbone keys of a shipped protocol (dataset, data_root,
backbone, img_size, test_fraction, seed, ...): the continual-learning keys (tasks, memory, the
continual training budget) say nothing about pretraining and are left out, with one note. A seed
list (a protocol's seeds) pretrains under the first seed and keeps the test images of every listed
seed out of the pretraining images, so one backbone serves each seed's continual run.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from dynammo.config import ALIASES, OPTIONS, Config, Option, coerce
from dynammo.config_yaml import parse_overrides, read_yaml
from dynammo.errors import UserError
from dynammo.registry import closest
from dynammo.run import seeds_of

SSL_METHODS = ("simsiam", "moco_v2")
# base learning rates of the papers for a batch of 256, scaled linearly with the batch (lr = base * B / 256)
BASE_LRATE = {"simsiam": 0.05, "moco_v2": 0.03}

# The framework's keys that mean the same in a pretraining run.
GENERAL_KEYS = (
    "protocol", "dataset", "data_root", "backbone", "pretrained", "img_size",
    "vit_patch_size", "vit_embed_dim", "vit_depth", "vit_heads",
    "seed", "test_fraction", "download", "in_memory", "num_workers", "normalize",
    "epochs", "batch_size", "eval_batch_size", "opt_type", "lrate", "weight_decay", "opt_mom",
    "scheduler", "milestones", "lrate_decay",
    "device", "amp", "memory_format", "checkpoint_every", "tensorboard", "plots", "progress",
)
# What a protocol file holds beyond those: the continual run's own keys, left out of a pretraining.
CONTINUAL_ONLY = ("init_cls", "increment", "shuffle", "class_order", "memory_size", "memory_per_class", "metric",
                  "augment", "max_train_per_class", "max_test_per_class", "init_epochs")
# Keys a protocol gives that the pretraining takes (the rest, e.g. its epochs, are the continual budget).
FROM_PROTOCOL = ("protocol", "dataset", "data_root", "backbone", "img_size", "vit_patch_size", "vit_embed_dim",
                 "vit_depth", "vit_heads", "seed", "test_fraction", "download", "in_memory", "num_workers",
                 "normalize")

PRETRAIN_OPTIONS: Dict[str, Option] = {
    "ssl_method": Option("str", "simsiam", "self-supervised method: simsiam (Chen & He, CVPR 2021) | moco_v2 "
                                           "(Chen, Fan, Girshick & He, arXiv 2003.04297)", choices=SSL_METHODS),
    "ssl_augment": Option("str", "natural", "the two views' augmentation: natural (the papers': random resized crop, "
                                            "colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, Gaussian blur "
                                            "p=0.5, flip) | medical (crop, flip, blur, brightness/contrast jitter "
                                            "0.2; no colour jitter or grayscale, which mean nothing for scans)",
                          choices=("natural", "medical")),
    "ssl_crop_min": Option("float", None, "smallest area share of the random resized crop (default: natural 0.2, "
                                          "the papers'; medical 0.4)", min=0.0, max=1.0, min_open=True),
    "ssl_folder": Option("str", None, "pretrain on the images of this folder, at any depth, no labels or class "
                                      "folders needed (default: the training split of `dataset`)"),
    "ssl_images": Option("str", "train", "which images of `dataset` to pretrain on: train (its training split under "
                                         "`seed`: the continual test split is never seen) | all (train + test: "
                                         "only for data that no continual run tests on; no test split is held out "
                                         "unless ssl_holdout_seeds names seeds)", choices=("train", "all")),
    "ssl_holdout_seeds": Option("int_list", None, "also keep out the test split of each of these seeds (default: "
                                                  "every seed when `seed` is a list, with ssl_images=train)",
                                min=0, max=2**32 - 1),
    "ssl_exclude_classes": Option("str_list", None, "classes (names or ids) whose images are kept out of the "
                                                    "pretraining (e.g. the classes of later tasks)", unique=True),
    "ssl_max_images": Option("int", None, "seeded uniform subsample of the pretraining images", min=1),
    "moco_queue": Option("int", None, "moco_v2: negatives in the queue, a multiple of batch_size (default: 4096, "
                                      "or the multiple of batch_size nearest half the pretraining images when "
                                      "that is smaller) [paper: 65536 for ImageNet's 1.28M images]", min=1),
    "moco_momentum": Option("float", 0.999, "moco_v2: momentum of the key encoder's moving average (MoCo v3 uses "
                                            "0.99; a short run moves a 0.999 key encoder little)",
                            min=0.0, max=1.0, max_open=True, faithful=0.999),
    "moco_temperature": Option("float", 0.2, "moco_v2: temperature of the InfoNCE loss", min=0.0, min_open=True,
                               faithful=0.2),
    "moco_dim": Option("int", 128, "moco_v2: width of the normalised embedding", min=1, faithful=128),
    "moco_hidden_dim": Option("int", None, "moco_v2: hidden width of the 2-layer MLP head (default: the backbone's "
                                           "feature width, as 2048 is ResNet-50's)", min=1),
    "moco_bn_groups": Option("int", 2, "moco_v2: shuffling BN on one device: the batch is cut into this many "
                                       "groups with their own BatchNorm statistics and the keys are shuffled across "
                                       "them (the paper's per-GPU BN); 1 = plain BN over the whole batch", min=1),
    "simsiam_proj_dim": Option("int", 2048, "simsiam: width of the projection MLP (its hidden and output fc)",
                               min=1, faithful=2048),
    "simsiam_proj_layers": Option("int", 3, "simsiam: fc layers of the projection MLP (3 for ImageNet, 2 in the "
                                            "paper's CIFAR runs)", min=1, max=8),
    "simsiam_pred_dim": Option("int", 512, "simsiam: hidden (bottleneck) width of the 2-layer prediction MLP",
                               min=1, faithful=512),
    "simsiam_stop_gradient": Option("bool", True, "simsiam: stop the gradient through the target branch (false is "
                                                  "the paper's ablation, which collapses)", faithful=True),
    "knn_every": Option("int", 1, "epochs between k-NN monitor evaluations (the end of the run always has one; "
                                  "0: only at the end)", min=0),
    "knn_k": Option("int", 200, "neighbours of the k-NN monitor (capped to the memory bank's size)", min=1),
    "knn_temperature": Option("float", 0.07, "k-NN monitor: votes weighted by exp(cosine / t) (InstDisc, Wu et al. "
                                             "2018)", min=0.0, min_open=True),
    "knn_vote": Option("str", "weighted", "k-NN monitor: weighted (exp(cosine/t) per neighbour) | majority",
                       choices=("weighted", "majority")),
    "knn_dataset": Option("str", "auto", "the labeled dataset of the k-NN monitor: auto (`dataset` when pretraining on "
                                         "it, none with ssl_folder) | none | a dataset name (under data_root)"),
    "knn_bank_per_class": Option("int", 200, "k-NN monitor: labeled training images per class in its memory bank "
                                             "(seeded)", min=1),
    "knn_test_per_class": Option("int", 200, "k-NN monitor: test images per class it classifies (seeded)", min=1),
    "ssl_collapse_std": Option("float", 0.02, "collapse detection: stop the run when the std of the l2-normalised "
                                              "backbone features or embeddings (per dimension, averaged, in units of "
                                              "1/sqrt(dim): 1 = spread evenly over the sphere, 0 = one point; "
                                              "measured every epoch) falls below this (0: never)", min=0.0, max=1.0),
    "ssl_probe_images": Option("int", 512, "images whose features measure the feature std every epoch", min=2),
    # general keys with defaults of their own in a pretraining run
    "epochs": Option("int", 20, "pretraining epochs (the papers: 100-800 on ImageNet)", min=1),
    "batch_size": Option("int", 64, "pretraining batch size (the papers: 256-512)", min=1),
    "lrate": Option("float", None, "learning rate (default: the paper's base rate x batch_size / 256: simsiam 0.05, "
                                   "moco_v2 0.03)", min=0.0, min_open=True),
    "weight_decay": Option("float", 1e-4, "weight decay (both papers: 1e-4)", min=0.0),
    "scheduler": Option("str", "cos", "learning-rate schedule (both papers: cos)", choices=("multi_step", "cos", "none")),
    "normalize": Option("str", "auto", "input normalisation: auto (the statistics of the backbone's pretrained "
                                       "weights, ImageNet's or EfficientNet-Lite's 0.5: what `dynammo run "
                                       "pretrained: PATH` normalises with) | imagenet | inception | dataset | none",
                        choices=("auto", "dataset", "imagenet", "inception", "none")),
}


def pretrain_options() -> Dict[str, Option]:
    """Every key of a pretraining config: the general ones, then the pretraining ones (which win)."""
    known = {k: OPTIONS[k] for k in GENERAL_KEYS}
    known.update(PRETRAIN_OPTIONS)
    return known


def _canonical(raw: dict) -> dict:
    return {ALIASES.get(k, k): v for k, v in raw.items()}


def _source_values(source: str, notices: list) -> dict:
    """One `-c` argument: a shipped protocol (its data and backbone keys only) or a YAML file."""
    from dynammo.protocols import protocol_names, read_protocol

    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        values = _canonical(read_yaml(path))
        if values.get("protocol") is not None and "method" not in values:  # a protocol file
            return _protocol_part(values, f"protocol file {path}", notices)
        if "method" in values:  # a run's config.yaml or a full continual config: its data and backbone
            return _protocol_part(values, f"config file {path}", notices)
        return values
    if source in protocol_names():
        return _protocol_part(read_protocol(source), f"protocol {source}", notices)
    from dynammo.methods import METHODS

    if source.lower() in METHODS:
        raise UserError(f"-c {source} is a continual-learning method; `dynammo pretrain` takes a protocol or a YAML "
                        "file (the method is ssl_method=simsiam|moco_v2)")
    raise UserError(f"-c {source}: no such file or protocol; protocols: {', '.join(protocol_names())}"
                    f"{closest(source, protocol_names())}")


def _protocol_part(values: dict, label: str, notices: list) -> dict:
    taken = {k: v for k, v in values.items() if k in FROM_PROTOCOL}
    left = sorted(k for k in values if k not in FROM_PROTOCOL)
    if left:
        notices.append(f"note: {label}: pretraining takes its data and backbone keys only; not used: {', '.join(left)}")
    return taken


def compose_pretrain(sources: Sequence[str], overrides: Iterable[str] = (), notices: Optional[list] = None) -> dict:
    notices = notices if notices is not None else []
    raw: dict = {}
    for s in sources:
        raw.update(_source_values(str(s), notices))
    raw.update(_canonical(parse_overrides(overrides)))
    return raw


def build_pretrain_config(raw: dict, notices: Optional[list] = None) -> Config:
    """Validate a raw mapping against the pretraining keys: defaults filled, types and ranges checked,
    unknown keys refused with the closest known one."""
    known = pretrain_options()
    cfg = Config({k: copy.deepcopy(opt.default) for k, opt in known.items()})
    for key, value in _canonical(raw).items():
        if key not in known:
            if key in CONTINUAL_ONLY or key == "method":
                raise UserError(f"config key '{key}' belongs to a continual run, not to `dynammo pretrain`; remove it "
                                "(the self-supervised method is ssl_method=simsiam|moco_v2)")
            raise UserError(f"unknown config key '{key}' of `dynammo pretrain`{closest(key, known)}; see "
                            "`dynammo list --keys`")
        cfg[key] = coerce(key, known[key], value)
    check_pretrain_config(cfg)
    return cfg


def check_pretrain_config(cfg: Config) -> None:
    if isinstance(cfg.dataset, list):
        raise UserError(f"dataset={cfg.dataset}: `dynammo pretrain` takes one dataset (or ssl_folder=PATH); "
                        "pretrain on each and pick one, or point ssl_folder at a folder holding them all")
    if cfg.ssl_folder is not None:
        for key in ("ssl_holdout_seeds", "ssl_exclude_classes"):
            if cfg[key] is not None:
                raise UserError(f"{key} selects images of `dataset`, but ssl_folder={cfg.ssl_folder} pretrains on a "
                                f"folder without splits or classes; remove {key} or ssl_folder")
        if cfg.ssl_images != "train":
            raise UserError("ssl_images selects images of `dataset`, not of ssl_folder; remove it")
    if cfg.knn_dataset not in ("auto", "none"):
        from dynammo.data.datasets import DATASETS

        cfg["knn_dataset"] = DATASETS.canonical(cfg.knn_dataset)


def load_pretrain_config(sources: Sequence[str] = (), overrides: Iterable[str] = (),
                         notices: Optional[list] = None) -> Config:
    """`-c` sources + `key=value` overrides -> a validated pretraining config."""
    return build_pretrain_config(compose_pretrain(list(sources), overrides, notices), notices)


def run_seed(cfg) -> int:
    """The seed the pretraining runs under (the first of a list)."""
    return seeds_of(cfg)[0]


def holdout_seeds(cfg) -> List[int]:
    """Seeds whose test split is kept out of the pretraining images (the run's own always is)."""
    extra = cfg.ssl_holdout_seeds if cfg.ssl_holdout_seeds is not None else seeds_of(cfg)
    return sorted({run_seed(cfg), *extra})


def resolved_lrate(cfg) -> float:
    return cfg.lrate if cfg.lrate is not None else BASE_LRATE[cfg.ssl_method] * cfg.batch_size / 256


def deviations(cfg) -> List[str]:
    """Where the run, as configured, departs from its paper (pretrain.json `deviations`)."""
    out = []
    method_keys = {"simsiam": ("simsiam_proj_dim", "simsiam_pred_dim", "simsiam_stop_gradient"),
                   "moco_v2": ("moco_momentum", "moco_temperature", "moco_dim")}[cfg.ssl_method]
    for key in method_keys:
        opt = PRETRAIN_OPTIONS[key]
        if cfg[key] != opt.faithful:
            out.append(f"{key}={cfg[key]} instead of the paper's {opt.faithful}")
    if cfg.ssl_method == "simsiam":
        out.append("the predictor's learning rate follows the schedule (the paper keeps it constant)")
    return out
