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

DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "default.yaml"


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
        v = float(v)
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
        if not isinstance(v, bool):
            v = _as_str(key, v)
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
    if opt.min is not None:
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if isinstance(x, (int, float)) and x < opt.min:
                _fail(key, f">= {opt.min:g}", x)
    return v


# The framework's own keys. Method-specific keys live in each method's `options`.
OPTIONS: Dict[str, Option] = {
    "method": Option("str", "replay", "continual-learning method (see `dynammo list`)"),
    "dataset": Option("str_or_list", "digits", "dataset name, or a list for a dataset-per-task stream"),
    "data_root": Option("str", "data", "folder holding the dataset files"),
    "backbone": Option("str", "resnet18", "feature extractor (see `dynammo list`)"),
    "pretrained": Option("pretrained", False, "false | true (download) | path to a torchvision/timm state dict"),
    "img_size": Option("int", None, "resize images to this side length (default: the dataset's own)", min=4),
    "init_cls": Option("int", 2, "classes in the first task", min=1),
    "increment": Option("int_or_list", 2, "classes per later task, or the list of all task sizes", min=1),
    "shuffle": Option("bool", True, "shuffle the class order with the seed (ignored when class_order is set)"),
    "class_order": Option("int_list", None, "explicit class order (class ids)"),
    "seed": Option("int_or_list", 1993, "random seed, or a list: one run per seed"),
    "epochs": Option("int", 10, "training epochs per task", min=1),
    "batch_size": Option("int", 32, "training batch size", min=1),
    "eval_batch_size": Option("int", 256, "evaluation batch size", min=1),
    "opt_type": Option("str", "sgd", "optimiser", choices=("sgd", "adam", "adamw")),
    "lrate": Option("float", 0.01, "learning rate", min=0.0),
    "weight_decay": Option("float", 5e-4, "weight decay", min=0.0),
    "opt_mom": Option("float", 0.9, "SGD momentum", min=0.0),
    "scheduler": Option("str", "multi_step", "learning-rate schedule", choices=("multi_step", "cos", "none")),
    "milestones": Option("int_list", [], "epochs at which multi_step decays the rate", min=1),
    "lrate_decay": Option("float", 0.1, "multi_step decay factor", min=0.0),
    "init_epochs": Option("int", None, "epochs of the first task (default: epochs)", min=1),
    "init_lrate": Option("float", None, "learning rate of the first task (default: lrate)", min=0.0),
    "init_milestones": Option("int_list", None, "multi_step milestones of the first task (default: milestones)", min=1),
    "init_lrate_decay": Option("float", None, "decay factor of the first task (default: lrate_decay)", min=0.0),
    "init_weight_decay": Option("float", None, "weight decay of the first task (default: weight_decay)", min=0.0),
    "memory_size": Option("int", 0, "total exemplar budget split over seen classes (0: none)", min=0),
    "memory_per_class": Option("int", None, "fixed exemplars per class (overrides memory_size)", min=1),
    "sampling_method": Option("str", "herding", "exemplar selection",
                              choices=("herding", "random", "closest_to_mean", "reservoir")),
    "device": Option("str", "auto", "auto | cpu | cuda | cuda:N | mps"),
    "amp": Option("bool", False, "mixed precision (bfloat16 on CPU, float16 on CUDA)"),
    "num_workers": Option("int", 0, "data-loading workers for file-backed datasets", min=0),
    "max_train_per_class": Option("int", None, "seeded subsample of each class's training images", min=1),
    "max_test_per_class": Option("int", None, "seeded subsample of each class's test images", min=1),
    "download": Option("bool", True, "download missing dataset files (MedMNIST, CIFAR) when online"),
    "test_fraction": Option("float", 0.2, "test share for datasets without an official split", min=0.0),
    "augment": Option("bool", True, "default training augmentation (random crop + horizontal flip)"),
    "normalize": Option("str", "dataset", "per-channel normalisation statistics",
                        choices=("dataset", "imagenet", "none")),
    "in_memory": Option("auto_bool", "auto", "hold decoded images in memory: auto | true | false"),
    "save_checkpoints": Option("bool", True, "write a checkpoint after every task"),
    "checkpoint_every": Option("int", 0, "also write a checkpoint inside a task every N epochs of each stage "
                                          "(0: only after each task and on SIGINT/SIGTERM)", min=0),
    "tensorboard": Option("bool", True, "write TensorBoard scalars to tb/"),
    "plots": Option("bool", True, "write plots/ after the run"),
    "progress": Option("auto_bool", "auto", "progress bars: auto (when a terminal) | true | false"),
    "eval_task_il": Option("bool", True, "also report task-incremental accuracy"),
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
}
# Keys of the reference framework that have no effect here; accepted and reported, never silently.
IGNORED_REFERENCE_KEYS = {
    "prefix", "version_name", "note", "save_models", "logger_type", "apply_nme", "incre_type",
    "eval_metric", "save_pred_record", "checkpoint_names", "openset_test", "is_openset_test",
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


def load_config(path=None, overrides: Iterable[str] = (), extra: Optional[dict] = None, notices=None) -> Config:
    """File (or the embedded default) + overrides -> validated Config."""
    raw = read_yaml(path if path is not None else DEFAULT_CONFIG)
    user = dict(extra or {})
    user.update(parse_overrides(overrides))
    if path is None and "method" in user:
        # The embedded default's method-specific keys only apply to its own method.
        from dynammo.methods import METHODS

        method = METHODS.canonical(coerce("method", OPTIONS["method"], user["method"]))
        allowed = set(OPTIONS) | set(method_options(method))
        raw = {k: v for k, v in raw.items() if k in allowed}
    raw.update(user)
    return build_config(raw, notices)

