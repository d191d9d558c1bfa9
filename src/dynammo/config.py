"""Typed configuration: YAML file (or the embedded default) + `key=value` overrides.

Every key has a declared type; values are checked, not guessed (`false` is False, `2.5` is not an
int), and unknown keys are an error that names the closest known key. Methods declare their own
keys (`Method.options`) next to their code.
"""
from __future__ import annotations

import copy
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from dynammo.errors import UserError
from dynammo.registry import closest



NOT_DECLARED = object()  # an Option without a paper value
# Every integer key's sanity bound unless it declares its own: a value past it is a typo (1e29 epochs),
# not a setting, and would overflow the int32/int64 sizes torch and the data loaders take.
INT_CEILING = 2**31 - 1
MAX_EPOCHS = 100_000  # the epochs keys' bound: far beyond any paper's schedule, short of "forever"
INT_KINDS = ("int", "int_list", "int_or_list")
# Bounds on one config value before anything formats, compares or copies it: YAML aliases let a
# 370-byte file stand for a value of billions of items (each use of an alias counts again here).
MAX_VALUE_ITEMS = 100_000
MAX_VALUE_CHARS = 1_000_000
MAX_VALUE_DEPTH = 32
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB of key: value lines

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value) -> str:
    """A value as a message quotes it: at most a line, whatever its size (bounded work, too)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1000:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"  # its repr: slow or refused
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int inside a list past Python's digit limit
        return f"a {type(value).__name__}"


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
    # an upper bound that catches typos rather than describes the key (INT_CEILING for every integer
    # key without a declared max); said in the range text as "and <= N"
    sane_max: Optional[float] = None

    def __post_init__(self):
        if self.kind in INT_KINDS and self.max is None and self.sane_max is None:
            object.__setattr__(self, "sane_max", INT_CEILING)

    def range_text(self) -> str:
        """The declared range in words ('> 0', 'in [0, 1)', ...); '' when unbounded."""
        lo, hi = (None if x is None else (str(int(x)) if float(x).is_integer() else f"{x:g}")
                  for x in (self.min, self.max))
        if lo is not None and hi is not None:
            return f"in {'(' if self.min_open else '['}{lo}, {hi}{')' if self.max_open else ']'}"
        sane = f" and <= {int(self.sane_max)}" if self.sane_max is not None and hi is None else ""
        if lo is not None:
            return f"{'>' if self.min_open else '>='} {lo}{sane}"
        if sane:
            return sane[len(" and "):]
        if hi is not None:
            return f"{'<' if self.max_open else '<='} {hi}"
        return ""

    def in_range(self, x) -> bool:
        if self.min is not None and (x <= self.min if self.min_open else x < self.min):
            return False
        if self.max is not None and (x >= self.max if self.max_open else x > self.max):
            return False
        return self.sane_max is None or x <= self.sane_max


def _fail(key, want, value):
    raise UserError(f"config key '{key}' must be {want}, got {shown(value)}; fix it in the YAML file or as {key}=VALUE")


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
                    f"config key '{key}' must be one of {', '.join(map(str, opt.choices))}, got {shown(x)}"
                    f"{closest(x, opt.choices) if isinstance(x, str) and len(x) <= 100 else ''}"
                )
        if isinstance(v, str):
            v = v.lower()
    if isinstance(v, list):
        if opt.nonempty and not v:
            _fail(key, "a non-empty list", v)
        if opt.unique and len(set(map(repr, v))) != len(v):
            _fail(key, "a list without repeated items", v)
    if opt.min is not None or opt.max is not None or opt.sane_max is not None:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not opt.in_range(x):
                _fail(key, opt.range_text(), x)
    return v


# The framework's own keys. Method-specific keys live in each method's `options`.
OPTIONS: Dict[str, Option] = {
    "method": Option("str", "replay", "continual-learning method (see `dynammo list`)"),
    "protocol": Option("str", None, "name of the protocol the run follows (set by the protocol file; see `dynammo list`)"),
    "metric": Option("str", "acc", "the headline metric of the protocol: acc (accuracy over the images) | "
                                   "acc_task_mean (mean over tasks of each task's accuracy, as L2P / DualPrompt / "
                                   "CODA-Prompt report) | mcr (mean class recall)",
                     choices=("acc", "acc_task_mean", "mcr")),
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
    "shuffle_rule": Option("str", "numpy", "how shuffle draws the order: numpy (RandomState(seed).permutation, "
                                           "PyCIL's) | coda (CODA-Prompt's: the natural order for seed 0, "
                                           "random.seed(seed) + random.shuffle otherwise)", choices=("numpy", "coda")),
    "class_order": Option("int_list", None, "explicit class order (class ids)", min=0, nonempty=True,
                          unique=True),
    "seed": Option("int_or_list", 1993, "random seed, or a list: one run per seed", min=0,
                   max=2**32 - 1, nonempty=True, unique=True),
    "epochs": Option("int", 10, "training epochs per task", min=1, sane_max=MAX_EPOCHS),
    "batch_size": Option("int", 32, "training batch size", min=1),
    "eval_batch_size": Option("int", 256, "evaluation batch size", min=1),
    "opt_type": Option("str", "sgd", "optimiser", choices=("sgd", "adam", "adamw")),
    "lrate": Option("float", 0.01, "learning rate", min=0.0, min_open=True),
    "weight_decay": Option("float", 5e-4, "weight decay", min=0.0),
    "opt_mom": Option("float", 0.9, "SGD momentum", min=0.0, max=1.0, max_open=True),
    "scheduler": Option("str", "multi_step", "learning-rate schedule", choices=("multi_step", "cos", "none")),
    "milestones": Option("int_list", [], "epochs at which multi_step decays the rate", min=1, sane_max=MAX_EPOCHS),
    "lrate_decay": Option("float", 0.1, "multi_step decay factor", min=0.0, min_open=True, max=1.0),
    "init_epochs": Option("int", None, "epochs of the first task (default: epochs)", min=1, sane_max=MAX_EPOCHS),
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
    "normalize": Option("str", "auto", "per-channel normalisation statistics: auto (with pretrained weights "
                                        "the statistics they were trained with: imagenet, or inception for "
                                        "EfficientNet-Lite; else dataset) | dataset (a seeded sample of the "
                                        "training set) | imagenet | inception (mean = std = 0.5) | none",
                        choices=("auto", "dataset", "imagenet", "inception", "none")),
    "in_memory": Option("auto_bool", "auto", "hold decoded images in memory: auto | true | false"),
    "max_image_pixels": Option("int", 178_956_970, "an image file of more pixels (width x height) is refused before "
                                                   "it is decoded, a guard against decompression bombs (the default "
                                                   "is Pillow's own refusal threshold); raise it for genuine large "
                                                   "scans or slide tiles", min=1, max=2**40),
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


class _ValueTooLarge(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader whose merge keys (`<<: [*a, *a, ...]`, nested) cannot multiply a small file
    into millions of entries: aliases are shared objects (check_value_size bounds their expansion),
    but a merge copies its entries."""

    def flatten_mapping(self, node):
        super().flatten_mapping(node)
        self.merged_entries = getattr(self, "merged_entries", 0) + len(node.value)
        if self.merged_entries > MAX_VALUE_ITEMS:
            raise _ValueTooLarge


def load_yaml_text(text: str, what: str):
    """YAML text -> Python values (plain data only), or one UserError line; `what` names the source
    ("config file X", "override 'k=v'"). Deep nesting, merge-key and alias bombs are refused."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters already here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"{what} is not valid YAML{where}; fix its syntax") from None
    except RecursionError:
        raise UserError(f"{what} nests its values too deeply for a config (more than a few hundred levels); "
                        "write plain key: value lines") from None
    except _ValueTooLarge:
        raise UserError(f"{what} expands its merge keys (<<) to more than {MAX_VALUE_ITEMS} entries; "
                        "write the values out") from None
    except ValueError as exc:  # an integer of more than 4300 digits: Python refuses to convert it
        raise UserError(f"{what} holds a value YAML cannot convert ({' '.join(str(exc).split())[:100]}); "
                        "fix it") from None
    finally:
        if loader is not None:
            loader.dispose()


def decode_config_bytes(raw: bytes, path) -> str:
    """A config file's text: UTF-8 (a BOM allowed), or UTF-16/32 with a BOM (as Windows editors save it)."""
    import codecs

    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not {encoding.upper().replace('-SIG', '')} text (byte "
                        f"{exc.start}); save it as UTF-8") from None


def check_value_size(value, what: str) -> None:
    """Refuse a value of more than MAX_VALUE_ITEMS items, MAX_VALUE_CHARS characters or MAX_VALUE_DEPTH
    levels, counting every use of a shared (aliased) part again: what formatting, comparing or hashing
    the value would cost. Stops as soon as a bound is passed, so the check itself is bounded."""
    stack, items, chars = [(value, 0)], 1, 0
    while stack:
        v, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            raise UserError(f"{what} nests more than {MAX_VALUE_DEPTH} levels deep; a config value is a number, "
                            "a name or a short list")
        if isinstance(v, (str, bytes)):
            chars += len(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            chars += v.bit_length() // 3
        elif isinstance(v, dict):
            items += 2 * len(v)
            if items <= MAX_VALUE_ITEMS:
                stack.extend((x, depth + 1) for kv in v.items() for x in kv)
        elif isinstance(v, (list, tuple, set, frozenset)):
            items += len(v)
            if items <= MAX_VALUE_ITEMS:
                stack.extend((x, depth + 1) for x in v)
        if items > MAX_VALUE_ITEMS or chars > MAX_VALUE_CHARS:
            raise UserError(f"{what} holds more than {MAX_VALUE_ITEMS} items or {MAX_VALUE_CHARS} characters "
                            "(counting every use of a YAML alias); a config value is a number, a name or a short "
                            "list")


def check_mapping_values(data: dict, what: str) -> None:
    for key, value in data.items():
        check_value_size(key, f"a key of {what}")
        check_value_size(value, f"config key {shown(key)} of {what}")


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; give the path of a YAML file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a config is a few kB of "
                        "key: value lines: give the right file")
    data = load_yaml_text(decode_config_bytes(raw, path), f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, not a {type(data).__name__}")
    check_mapping_values(data, f"config file {path}")
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
        what = f"override {shown(item)}"
        if len(item) > MAX_VALUE_CHARS:
            raise UserError(f"{what} is longer than {MAX_VALUE_CHARS} characters; a config value is a number, "
                            "a name or a short list")
        try:
            out[key] = load_yaml_text(raw, what) if raw.strip() else None
        except UserError as exc:
            if not str(exc).endswith("fix its syntax"):
                raise  # nested too deeply, a merge-key or alias bomb: never kept as text
            out[key] = raw  # not YAML: the text itself (a path with a colon, ...)
        check_value_size(out[key], f"config key {shown(key)} of the command line")
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
    if not isinstance(raw, dict):
        raise UserError(f"a config must be a mapping of key: value, not a {type(raw).__name__}")
    check_mapping_values(raw, "the config")  # bounded before any value is formatted, compared or copied
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
            raise UserError(f"unknown config key {shown(key)}{closest(str(key)[:100], known)}; "
                            "see `dynammo list --keys`")
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
