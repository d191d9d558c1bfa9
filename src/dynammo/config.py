"""The config keys: each key's type, default, range and role (`Option`), and how a value is checked.

Every key has a declared type; values are checked, not guessed (`false` is False, `2.5` is not an
int), and unknown keys are an error that names the closest known key (configure.py). Methods declare
their own keys (`Method.options`) next to their code; config_yaml.py reads files and overrides.
"""
from __future__ import annotations

import copy
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from dynammo.errors import UserError
from dynammo.registry import closest


NOT_DECLARED = object()  # an Option without a paper value
# Every integer key's sanity bound unless it declares its own: a value past it is a typo (1e29 epochs),
# not a setting, and would overflow the int32/int64 sizes torch and the data loaders take.
INT_CEILING = 2**31 - 1
MAX_EPOCHS = 100_000  # the epochs keys' bound: far beyond any paper's schedule, short of "forever"
INT_KINDS = ("int", "int_list", "int_or_list")
# A key's role when runs are compared (protocols.py derives its key lists from these):
PROTOCOL = "protocol"  # equal for every method compared under one protocol, and part of its hash
NEUTRAL = "neutral"  # where a run runs, what it prints or logs, how often it saves: never what it computes
HASH_ROLES = ("always", "when_set", "never")
OPT_TYPES = ("sgd", "adam", "adamw")
SCHEDULERS = ("multi_step", "cos", "none")

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
    # PROTOCOL, NEUTRAL or "" (what a method or an experiment chooses: a resume or a sweep that changes
    # it makes another experiment)
    role: str = ""
    # a protocol key's part in the protocol hash: always; when_set (a key added after protocols were
    # first hashed: hashed only away from its default, so earlier runs keep their hash); never (the
    # seed: it varies between the runs of one protocol, each results.json records its own)
    hashed: str = "always"
    # a protocol key that shapes this backbone only: part of the protocol (and its hash) when it runs
    backbone_only: Optional[str] = None
    # a key a protocol file may hold although it is not compared (its name, where the data is)
    in_protocol_file: bool = False
    aliases: tuple = ()  # the reference framework's names for this key (CL_Pytorch / PyCIL configs)

    def __post_init__(self):
        if self.role not in ("", PROTOCOL, NEUTRAL) or self.hashed not in HASH_ROLES:
            raise ValueError(f"an Option's role is {PROTOCOL}, {NEUTRAL} or '', its hashed one of {HASH_ROLES}")
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
    "method": Option("str", "replay", "continual-learning method (see `dynammo list`)", aliases=("model_name",)),
    "protocol": Option("str", None, "name of the protocol the run follows (set by the protocol file; see `dynammo list`)",
                       in_protocol_file=True),
    "metric": Option("str", "acc", "the headline metric of the protocol: acc (accuracy over the images) | "
                                   "acc_task_mean (mean over tasks of each task's accuracy, as L2P / DualPrompt / "
                                   "CODA-Prompt report) | mcr (mean class recall)",
                     choices=("acc", "acc_task_mean", "mcr"), role=PROTOCOL),
    "dataset": Option("str_or_list", "digits", "dataset name, or a list for a dataset-per-task stream",
                      nonempty=True, role=PROTOCOL),
    "data_root": Option("str", "data", "folder holding the dataset files", role=NEUTRAL, in_protocol_file=True),
    "backbone": Option("str", "resnet18", "feature extractor (see `dynammo list`)",
                       role=PROTOCOL, aliases=("convnet_type", "net")),
    "pretrained": Option("pretrained", False, "false | true (download) | path to a torchvision/timm state dict "
                                              "(ViTs: also .safetensors or the original Google .npz)", role=PROTOCOL),
    "img_size": Option("int", None, "resize images to this side length (default: the dataset's own)",
                      min=4, max=8192, role=PROTOCOL, aliases=("image_size",)),
    "vit_patch_size": Option("int", 8, "backbone vit_cpu only: side of its square patches (img_size must be a "
                                       "multiple of it)", min=1, max=1024, role=PROTOCOL, backbone_only="vit_cpu"),
    "vit_embed_dim": Option("int", 64, "backbone vit_cpu only: token width (a multiple of vit_heads)", min=1,
                            max=8192, role=PROTOCOL, backbone_only="vit_cpu"),
    "vit_depth": Option("int", 5, "backbone vit_cpu only: number of transformer blocks", min=1, max=64,
                        role=PROTOCOL, backbone_only="vit_cpu"),
    "vit_heads": Option("int", 4, "backbone vit_cpu only: attention heads per block", min=1, max=128,
                        role=PROTOCOL, backbone_only="vit_cpu"),
    "init_cls": Option("int", 2, "classes in the first task", min=1, role=PROTOCOL),
    "increment": Option("int_or_list", 2, "classes per later task, or the list of all task sizes", min=1,
                        nonempty=True, role=PROTOCOL),
    "shuffle": Option("bool", True, "shuffle the class order with the seed (ignored when class_order is set)",
                      role=PROTOCOL),
    "shuffle_rule": Option("str", "numpy", "how shuffle draws the order: numpy (RandomState(seed).permutation, "
                                           "PyCIL's) | coda (CODA-Prompt's: the natural order for seed 0, "
                                           "random.seed(seed) + random.shuffle otherwise)", choices=("numpy", "coda"),
                           role=PROTOCOL, hashed="when_set"),
    "class_order": Option("int_list", None, "explicit class order (class ids)", min=0, nonempty=True,
                          unique=True, role=PROTOCOL),
    "seed": Option("int_or_list", 1993, "random seed, or a list: one run per seed", min=0,
                   max=2**32 - 1, nonempty=True, unique=True, role=PROTOCOL, hashed="never", aliases=("random_seed",)),
    "epochs": Option("int", 10, "training epochs per task", min=1, sane_max=MAX_EPOCHS, role=PROTOCOL),
    "batch_size": Option("int", 32, "training batch size", min=1, role=PROTOCOL),
    "eval_batch_size": Option("int", 256, "evaluation batch size", min=1, role=NEUTRAL),
    "opt_type": Option("str", "sgd", "optimiser", choices=OPT_TYPES, aliases=("optimizer",)),
    "lrate": Option("float", 0.01, "learning rate", min=0.0, min_open=True, aliases=("lr",)),
    "weight_decay": Option("float", 5e-4, "weight decay", min=0.0),
    "opt_mom": Option("float", 0.9, "SGD momentum", min=0.0, max=1.0, max_open=True, aliases=("momentum",)),
    "scheduler": Option("str", "multi_step", "learning-rate schedule", choices=SCHEDULERS),
    "milestones": Option("int_list", [], "epochs at which multi_step decays the rate", min=1, sane_max=MAX_EPOCHS),
    "lrate_decay": Option("float", 0.1, "multi_step decay factor", min=0.0, min_open=True, max=1.0,
                          aliases=("lr_decay",)),
    "init_epochs": Option("int", None, "epochs of the first task (default: epochs)", min=1, sane_max=MAX_EPOCHS,
                          role=PROTOCOL),
    "init_lrate": Option("float", None, "learning rate of the first task (default: lrate)", min=0.0,
                          min_open=True, aliases=("init_lr",)),
    "init_milestones": Option("int_list", None, "multi_step milestones of the first task (default: milestones)", min=1),
    "init_lrate_decay": Option("float", None, "decay factor of the first task (default: lrate_decay)",
                               min=0.0, min_open=True, max=1.0, aliases=("init_lr_decay",)),
    "init_weight_decay": Option("float", None, "weight decay of the first task (default: weight_decay)", min=0.0),
    "memory_size": Option("int", 0, "total exemplar budget split over seen classes (0: none)", min=0, role=PROTOCOL),
    "memory_per_class": Option("int", None, "fixed exemplars per class (overrides memory_size)", min=1, role=PROTOCOL),
    "sampling_method": Option("str", "herding", "exemplar selection",
                              choices=("herding", "random", "closest_to_mean", "reservoir")),
    "device": Option("str", "auto", "auto | cpu | cuda | cuda:N | mps", role=NEUTRAL),
    "amp": Option("auto_bool", "auto", "mixed precision: auto (bf16 autocast on a CPU with bf16 units, AVX512-BF16 "
                                       "or AMX; on CUDA bf16 where the GPU has it, else fp16 with a GradScaler; "
                                       "else fp32) | true (force it) | false (fp32); the run's log and results.json "
                                       "`compute` say which path ran"),
    "memory_format": Option("str", "auto", "layout of the images and activations: auto (channels_last under "
                                           "autocast on a CPU with bf16 units or on CUDA, else contiguous) | "
                                           "channels_last | contiguous (NCHW)",
                            choices=("auto", "channels_last", "contiguous")),
    "num_workers": Option("int", 0, "data-loading workers for file-backed datasets", min=0,
                          max=256, role=NEUTRAL, in_protocol_file=True, aliases=("workers",)),
    "max_train_per_class": Option("int", None, "seeded subsample of each class's training images", min=1,
                                  role=PROTOCOL),
    "max_test_per_class": Option("int", None, "seeded subsample of each class's test images", min=1, role=PROTOCOL),
    "download": Option("bool", True, "download missing dataset files (MedMNIST, CIFAR, ImageNet-R, TinyImageNet, "
                                     "CUB-200) when online", role=NEUTRAL, in_protocol_file=True),
    "test_fraction": Option("float", 0.2, "test share for datasets without an official split",
                            min=0.0, max=1.0, min_open=True, max_open=True, role=PROTOCOL),
    "augment": Option("bool", True, "default training augmentation (random crop + horizontal flip)", role=PROTOCOL),
    "augment_crop": Option("str", "pad", "the training crop: pad (zero-pad by 1/8 of the side, crop back at a random "
                                         "offset) | resized (RandomResizedCrop, area 0.08-1, ratio 3/4-4/3, as the "
                                         "prompt methods' code)", choices=("pad", "resized"),
                           role=PROTOCOL, hashed="when_set"),
    "test_crop": Option("str", "none", "the test view: none (the image as stored) | center (Resize(side*256/224) + "
                                       "CenterCrop(side), as L2P/DualPrompt's code)", choices=("none", "center"),
                        role=PROTOCOL, hashed="when_set"),
    "keep_aspect": Option("bool", False, "record each image's original height / width (read from the file headers) "
                                         "so the resized and centre crops fall where they do on the original image "
                                         "although it is stored squashed to img_size x img_size",
                          role=PROTOCOL, hashed="when_set"),
    "normalize": Option("str", "auto", "per-channel normalisation statistics: auto (with pretrained weights "
                                        "the statistics they were trained with: imagenet, or inception for "
                                        "EfficientNet-Lite; else dataset) | dataset (a seeded sample of the "
                                        "training set) | imagenet | inception (mean = std = 0.5) | none",
                        choices=("auto", "dataset", "imagenet", "inception", "none"), role=PROTOCOL),
    "in_memory": Option("auto_bool", "auto", "hold decoded images in memory: auto | true | false",
                        role=NEUTRAL, in_protocol_file=True),
    "max_image_pixels": Option("int", 178_956_970, "an image file of more pixels (width x height) is refused before "
                                                   "it is decoded, a guard against decompression bombs (the default "
                                                   "is Pillow's own refusal threshold); raise it for genuine large "
                                                   "scans or slide tiles", min=1, max=2**40),
    "save_checkpoints": Option("bool", True, "write a checkpoint after every task", role=NEUTRAL),
    "checkpoint_every": Option("int", 0, "also write a checkpoint inside a task every N epochs of each stage "
                                          "(0: only after each task and on SIGINT/SIGTERM)", min=0, role=NEUTRAL),
    "tensorboard": Option("bool", True, "write TensorBoard scalars to tb/ (with tracking=tensorboard; false: no tracking)",
                          role=NEUTRAL),
    "tracking": Option("str", "tensorboard", "experiment tracking: tensorboard (tb/, as long as tensorboard=true) | "
                                             "mlflow (an MLflow run instead of tb/: the config as params, the "
                                             "metrics of each task, results.json, config.yaml and plots as "
                                             "artifacts; needs pip install 'dynammo[mlflow]') | none",
                       choices=("tensorboard", "mlflow", "none"), role=NEUTRAL),
    "mlflow_uri": Option("str", None, "tracking=mlflow: the tracking URI, e.g. file:///abs/mlruns or http://host:5000 "
                                      "(default: the file store mlruns/ in the working directory, MLflow's own "
                                      "default, so `mlflow ui` started there shows every run)", role=NEUTRAL),
    "mlflow_experiment": Option("str", None, "tracking=mlflow: the MLflow experiment (default: the protocol's name, "
                                             "else dynammo)", role=NEUTRAL),
    "plots": Option("bool", True, "write plots/ after the run", role=NEUTRAL),
    "progress": Option("auto_bool", "auto", "progress bars: auto (when a terminal) | true | false", role=NEUTRAL),
    "eval_task_il": Option("bool", True, "also report task-incremental accuracy"),
    "eval_openset": Option("bool", True, "after each task, also test the images of the classes not learned yet and "
                                         "report how well the model tells them from the seen ones (results.json "
                                         "openset: AUROC, FPR at 95% TPR, AUPR); costs one test pass over them",
                           aliases=("openset_test", "is_openset_test")),
}

# Keys of the reference framework (CL_Pytorch / PyCIL style configs) mapped to ours.
ALIASES = {alias: key for key, opt in OPTIONS.items() for alias in opt.aliases}
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