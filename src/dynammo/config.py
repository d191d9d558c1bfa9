"""Typed configuration: YAML file (or the embedded default) + `key=value` overrides.

Every key has a declared type; values are checked, not guessed (`false` is False, `2.5` is not an
int), and unknown keys are an error that names the closest known key. Methods declare their own
keys (`Method.options`) next to their code.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from dynammo.errors import UserError
from dynammo.registry import closest



NOT_DECLARED = object()  # an Option without a paper value


@dataclass(frozen=True)
class Option:
    """One config key: its type, default and a one-line help text.

    kinds: int, float, bool, str, int_list, float_list, str_list, int_or_list, str_or_list,
    auto_bool (auto | true | false), pretrained (false | true | path).
    """

    kind: str
    default: Any
    help: str
    choices: tuple = ()
    min: Optional[float] = None
    nullable: bool = False
    # the valid range of a number (of every item of a list): [min, max], an end left out when
    # min_open / max_open (0 < test_fraction < 1); `nonempty` / `unique` constrain a list value
    max: Optional[float] = None
    min_open: bool = False
    max_open: bool = False
    nonempty: bool = False
    unique: bool = False
    # the value of the method's paper (or the reference implementation's, where METHODS.md says so);
    # a run with another value records it in results.json `deviations` and in its label
    faithful: Any = NOT_DECLARED

    def range_text(self) -> str:
        """The declared range in words ('> 0', 'in [0, 1)', ...); '' when unbounded."""
        lo, hi = (None if x is None else (str(int(x)) if float(x).is_integer() else f"{x:g}")
                  for x in (self.min, self.max))
        if lo is not None and hi is not None:
            return f"in {'(' if self.min_open else '['}{lo}, {hi}{')' if self.max_open else ']'}"
        if lo is not None:
            return f"{'>' if self.min_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.max_open else '<='} {hi}"
        return ""

    def in_range(self, x) -> bool:
        if self.min is not None and (x <= self.min if self.min_open else x < self.min):
            return False
        if self.max is not None and (x >= self.max if self.max_open else x > self.max):
            return False
        return True


def _fail(key, want, value):
    raise UserError(f"config key '{key}' must be {want}, got {value!r}; fix it in the YAML file or as {key}=VALUE")


def _as_int(key, v):
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            _fail(key, "an integer", v)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(key, "an integer", v)
    return v


def _as_float(key, v):
    if isinstance(v, bool):
        _fail(key, "a number", v)
    if isinstance(v, (int, float)):
        try:
            v = float(v)
        except OverflowError:  # an int too large for a float
            _fail(key, "a finite number", v)
    elif isinstance(v, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            _fail(key, "a number", v)
    else:
        _fail(key, "a number", v)
    if not math.isfinite(v):
        _fail(key, "a finite number", v)
    return v


def _as_list(key, v, item, want):
    if isinstance(v, tuple):
        v = list(v)
    if not isinstance(v, list):
        _fail(key, want, v)
    return [item(key, x) for x in v]


def _as_str(key, v):
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        _fail(key, "a string", v)
    return str(v)


def coerce(key: str, opt: Option, v: Any) -> Any:
    """Check and convert one value to the option's type."""
    if v is None:
        if opt.nullable or opt.default is None:
            return None
        _fail(key, f"set (type {opt.kind})", v)
    k = opt.kind
    if k == "int":
        v = _as_int(key, v)
    elif k == "float":
        v = _as_float(key, v)
    elif k == "bool":
        if not isinstance(v, bool):
            _fail(key, "true or false", v)
    elif k == "str":
        v = _as_str(key, v)
    elif k == "int_list":
        v = _as_list(key, v, _as_int, "a list of integers")
    elif k == "float_list":
        v = _as_list(key, v, _as_float, "a list of numbers")
    elif k == "str_list":
        v = _as_list(key, v, _as_str, "a list of strings")
    elif k == "int_or_list":
        v = _as_list(key, v, _as_int, "an integer or a list of integers") if isinstance(v, (list, tuple)) else _as_int(key, v)
    elif k == "str_or_list":
        v = _as_list(key, v, _as_str, "a name or a list of names") if isinstance(v, (list, tuple)) else _as_str(key, v)
    elif k == "auto_bool":  # auto | true | false, kept as one of those strings
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif not (isinstance(v, str) and v.lower() in ("auto", "true", "false")):
            _fail(key, "auto, true or false", v)
        v = v.lower()
    elif k == "pretrained":
        if not isinstance(v, (bool, str)):
            _fail(key, "false, true or the path of a weights file", v)
        if isinstance(v, str):
            low = v.lower()
            if low in ("true", "false"):
                v = low == "true"
    else:  # pragma: no cover - a programming error in an Option declaration
        raise ValueError(f"unknown option kind {k}")
    if opt.choices:
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if (x.lower() if isinstance(x, str) else x) not in opt.choices:
                raise UserError(
                    f"config key '{key}' must be one of {', '.join(map(str, opt.choices))}, got {x!r}{closest(x, opt.choices)}"
                )
        if isinstance(v, str):
            v = v.lower()
    if isinstance(v, list):
        if opt.nonempty and not v:
            _fail(key, "a non-empty list", v)
        if opt.unique and len(set(map(repr, v))) != len(v):
            _fail(key, "a list without repeated items", v)
    if opt.min is not None or opt.max is not None:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not opt.in_range(x):
                _fail(key, opt.range_text(), x)
    return v


# The framework's own keys. Method-specific keys live in each method's `options`.
OPTIONS: Dict[str, Option] = {
    "method": Option("str", "replay", "continual-learning method (see `dynammo list`)"),
    "protocol": Option("str", None, "name of the protocol the run follows (set by the protocol file; see `dynammo list`)"),
    "metric": Option("str", "acc", "the headline metric of the protocol: acc (accuracy) | mcr (mean class recall)",
                     choices=("acc", "mcr")),
    "dataset": Option("str_or_list", "digits", "dataset name, or a list for a dataset-per-task stream",
                      nonempty=True),
    "data_root": Option("str", "data", "folder holding the dataset files"),
    "backbone": Option("str", "resnet18", "feature extractor (see `dynammo list`)"),
    "pretrained": Option("pretrained", False, "false | true (download) | path to a torchvision/timm state dict "
                                              "(ViTs: also .safetensors or the original Google .npz)"),
    "img_size": Option("int", None, "resize images to this side length (default: the dataset's own)",
                      min=4, max=8192),
    "vit_patch_size": Option("int", 8, "backbone vit_cpu only: side of its square patches (img_size must be a "
                                       "multiple of it)", min=1, max=1024),
    "vit_embed_dim": Option("int", 64, "backbone vit_cpu only: token width (a multiple of vit_heads)", min=1,
                            max=8192),
    "vit_depth": Option("int", 5, "backbone vit_cpu only: number of transformer blocks", min=1, max=64),
    "vit_heads": Option("int", 4, "backbone vit_cpu only: attention heads per block", min=1, max=128),
    "init_cls": Option("int", 2, "classes in the first task", min=1),
    "increment": Option("int_or_list", 2, "classes per later task, or the list of all task sizes", min=1,
                        nonempty=True),
    "shuffle": Option("bool", True, "shuffle the class order with the seed (ignored when class_order is set)"),
    "class_order": Option("int_list", None, "explicit class order (class ids)", min=0, nonempty=True,
                          unique=True),
    "seed": Option("int_or_list", 1993, "random seed, or a list: one run per seed", min=0,
                   max=2**32 - 1, nonempty=True, unique=True),
    "epochs": Option("int", 10, "training epochs per task", min=1),
    "batch_size": Option("int", 32, "training batch size", min=1),
    "eval_batch_size": Option("int", 256, "evaluation batch size", min=1),
    "opt_type": Option("str", "sgd", "optimiser", choices=("sgd", "adam", "adamw")),
    "lrate": Option("float", 0.01, "learning rate", min=0.0, min_open=True),
    "weight_decay": Option("float", 5e-4, "weight decay", min=0.0),
    "opt_mom": Option("float", 0.9, "SGD momentum", min=0.0, max=1.0, max_open=True),
    "scheduler": Option("str", "multi_step", "learning-rate schedule", choices=("multi_step", "cos", "none")),
    "milestones": Option("int_list", [], "epochs at which multi_step decays the rate", min=1),
    "lrate_decay": Option("float", 0.1, "multi_step decay factor", min=0.0, min_open=True, max=1.0),
    "init_epochs": Option("int", None, "epochs of the first task (default: epochs)", min=1),
    "init_lrate": Option("float", None, "learning rate of the first task (default: lrate)", min=0.0,
                          min_open=True),
    "init_milestones": Option("int_list", None, "multi_step milestones of the first task (default: milestones)", min=1),
    "init_lrate_decay": Option("float", None, "decay factor of the first task (default: lrate_decay)",
                               min=0.0, min_open=True, max=1.0),
    "init_weight_decay": Option("float", None, "weight decay of the first task (default: weight_decay)", min=0.0),
    "memory_size": Option("int", 0, "total exemplar budget split over seen classes (0: none)", min=0),
    "memory_per_class": Option("int", None, "fixed exemplars per class (overrides memory_size)", min=1),
    "sampling_method": Option("str", "herding", "exemplar selection",
                              choices=("herding", "random", "closest_to_mean", "reservoir")),
    "device": Option("str", "auto", "auto | cpu | cuda | cuda:N | mps"),
    "amp": Option("auto_bool", "auto", "mixed precision: auto (bf16 autocast on a CPU with bf16 units, AVX512-BF16 "
                                       "or AMX; on CUDA bf16 where the GPU has it, else fp16 with a GradScaler; "
                                       "else fp32) | true (force it) | false (fp32); the run's log and results.json "
                                       "`compute` say which path ran"),
    "memory_format": Option("str", "auto", "layout of the images and activations: auto (channels_last under "
                                           "autocast on a CPU with bf16 units or on CUDA, else contiguous) | "
                                           "channels_last | contiguous (NCHW)",
                            choices=("auto", "channels_last", "contiguous")),
    "num_workers": Option("int", 0, "data-loading workers for file-backed datasets", min=0,
                          max=256),
    "max_train_per_class": Option("int", None, "seeded subsample of each class's training images", min=1),
    "max_test_per_class": Option("int", None, "seeded subsample of each class's test images", min=1),
    "download": Option("bool", True, "download missing dataset files (MedMNIST, CIFAR, ImageNet-R, TinyImageNet, "
                                     "CUB-200) when online"),
    "test_fraction": Option("float", 0.2, "test share for datasets without an official split",
                            min=0.0, max=1.0, min_open=True, max_open=True),
    "augment": Option("bool", True, "default training augmentation (random crop + horizontal flip)"),
    "augment_crop": Option("str", "pad", "the training crop: pad (zero-pad by 1/8 of the side, crop back at a random "
                                         "offset) | resized (RandomResizedCrop, area 0.08-1, ratio 3/4-4/3, as the "
                                         "prompt methods' code)", choices=("pad", "resized")),
    "test_crop": Option("str", "none", "the test view: none (the image as stored) | center (Resize(side*256/224) + "
                                       "CenterCrop(side), as L2P/DualPrompt's code)", choices=("none", "center")),
    "keep_aspect": Option("bool", False, "record each image's original height / width (read from the file headers) "
                                         "so the resized and centre crops fall where they do on the original image "
                                         "although it is stored squashed to img_size x img_size"),
    "normalize": Option("str", "auto", "per-channel normalisation statistics: auto (imagenet with pretrained "
                                        "weights, else dataset) | dataset (a seeded sample of the training set) | "
                                        "imagenet | none", choices=("auto", "dataset", "imagenet", "none")),
    "in_memory": Option("auto_bool", "auto", "hold decoded images in memory: auto | true | false"),
    "save_checkpoints": Option("bool", True, "write a checkpoint after every task"),
    "checkpoint_every": Option("int", 0, "also write a checkpoint inside a task every N epochs of each stage "
                                          "(0: only after each task and on SIGINT/SIGTERM)", min=0),
    "tensorboard": Option("bool", True, "write TensorBoard scalars to tb/ (with tracking=tensorboard; false: no tracking)"),
    "tracking": Option("str", "tensorboard", "experiment tracking: tensorboard (tb/, as long as tensorboard=true) | "
                                             "mlflow (an MLflow run instead of tb/: the config as params, the "
                                             "metrics of each task, results.json, config.yaml and plots as "
                                             "artifacts; needs pip install 'dynammo[mlflow]') | none",
                       choices=("tensorboard", "mlflow", "none")),
    "mlflow_uri": Option("str", None, "tracking=mlflow: the tracking URI, e.g. file:///abs/mlruns or http://host:5000 "
                                      "(default: the file store mlruns/ in the working directory, MLflow's own "
                                      "default, so `mlflow ui` started there shows every run)"),
    "mlflow_experiment": Option("str", None, "tracking=mlflow: the MLflow experiment (default: the protocol's name, "
                                             "else dynammo)"),
    "plots": Option("bool", True, "write plots/ after the run"),
    "progress": Option("auto_bool", "auto", "progress bars: auto (when a terminal) | true | false"),
    "eval_task_il": Option("bool", True, "also report task-incremental accuracy"),
    "eval_openset": Option("bool", True, "after each task, also test the images of the classes not learned yet and "
                                         "report how well the model tells them from the seen ones (results.json "
                                         "openset: AUROC, FPR at 95% TPR, AUPR); costs one test pass over them"),
}

# Keys of the reference framework (CL_Pytorch / PyCIL style configs) mapped to ours.
ALIASES = {
    "model_name": "method",
    "convnet_type": "backbone",
    "net": "backbone",
    "random_seed": "seed",
    "lr": "lrate",
    "optimizer": "opt_type",
    "momentum": "opt_mom",
    "workers": "num_workers",
    "lr_decay": "lrate_decay",
    "init_lr": "init_lrate",
    "init_lr_decay": "init_lrate_decay",
    "image_size": "img_size",
    "openset_test": "eval_openset",
    "is_openset_test": "eval_openset",
}
# Keys of the reference framework that have no effect here; accepted and reported, never silently.
IGNORED_REFERENCE_KEYS = {
    "prefix", "version_name", "note", "save_models", "logger_type", "apply_nme", "incre_type",
    "eval_metric", "save_pred_record", "checkpoint_names",
    "fixed_memory", "convnet", "topk", "log_dir", "save_path", "method_type", "split_dataset",
}


class Config(dict):
    """A validated config: a plain dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def copy(self) -> "Config":
        return Config(copy.deepcopy(dict(self)))


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix its syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, not a {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value (for example epochs=2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override '{item}' has no key; write key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def method_options(method: str) -> Dict[str, Option]:
    from dynammo.methods import METHODS

    return METHODS.get(method).options


def all_method_options() -> Dict[str, list]:
    from dynammo.methods import METHODS

    owners: Dict[str, list] = {}
    for name in METHODS.names():
        for key in METHODS.get(name).options:
            owners.setdefault(key, []).append(name)
    return owners


def build_config(raw: dict, notices: Optional[list] = None) -> Config:
    """Validate a raw mapping: fill defaults, check types, reject unknown keys."""
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    from dynammo.methods import METHODS

    method = METHODS.canonical(coerce("method", OPTIONS["method"], raw.get("method", OPTIONS["method"].default)))
    known = dict(OPTIONS)
    known.update(method_options(method))
    cfg = Config()
    for key, opt in known.items():
        cfg[key] = copy.deepcopy(opt.default)
    owners = all_method_options()
    for key, value in raw.items():
        if key in IGNORED_REFERENCE_KEYS:
            if notices is not None:
                notices.append(f"note: reference-framework key '{key}' has no effect in dynammo and was ignored")
            continue
        if key not in known:
            if key in owners:
                raise UserError(
                    f"config key '{key}' is not used by method '{method}' (it belongs to: {', '.join(owners[key])}); remove it"
                )
            raise UserError(f"unknown config key '{key}'{closest(key, known)}; see `dynammo list --keys`")
        cfg[key] = coerce(key, known[key], value)
    cfg["method"] = method
    return cfg


def load_config(sources=None, overrides: Iterable[str] = (), extra: Optional[dict] = None, notices=None) -> Config:
    """`-c` sources (YAML paths, protocol names, method names; none: the embedded default) +
    overrides -> validated Config. See protocols.py for how they compose."""
    from dynammo.protocols import compose

    if sources is None:
        sources = []
    elif isinstance(sources, (str, Path)):
        sources = [str(sources)]
    return build_config(compose([str(s) for s in sources], overrides, extra, notices), notices)
