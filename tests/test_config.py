"""Typed config: coercion, overrides, validation, reference-framework compatibility."""
from __future__ import annotations

import pytest

from dynammo import legacy
from dynammo.config import Option
from dynammo.config_yaml import parse_overrides, read_yaml
from dynammo.configure import build_config, load_config
from dynammo.protocols import protocol_path, shipped_method_file
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.methods.base import Method
from dynammo.run import seeds_of


# ---------------------------------------------------------------- types


def test_default_config_is_the_digits_protocol_with_dynammo():
    cfg = load_config(None, [])
    raw = {**read_yaml(protocol_path("digits")), **read_yaml(shipped_method_file("dynammo", "digits"))}
    for key, value in raw.items():
        assert cfg[key] == value, key
    # keys the YAML files do not set get their declared defaults
    assert cfg.normalize == "auto" and cfg.augment is True and cfg.class_order is None


def test_overrides_are_typed():
    cfg = load_config(None, ["epochs=3", "augment=false", "lrate=1e-3", "weight_decay=0", "seed=7",
                             "img_size=32", "pretrained=false", "memory_size=20"])
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.augment is False
    assert cfg.lrate == pytest.approx(1e-3) and type(cfg.lrate) is float
    assert cfg.weight_decay == 0.0 and type(cfg.weight_decay) is float  # an int for a float key becomes float
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert cfg.pretrained is False
    assert cfg.memory_size == 20


def test_yaml_scientific_notation_string_becomes_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` without a dot as the string '1e-3'
    path = tmp_path / "c.yaml"
    path.write_text("lrate: 1e-3\nweight_decay: 5e-4\nepochs: 2\n")
    cfg = load_config(path, [])
    assert cfg.lrate == pytest.approx(0.001) and isinstance(cfg.lrate, float)
    assert cfg.weight_decay == pytest.approx(5e-4)
    assert cfg.epochs == 2


@pytest.mark.parametrize("override, key", [
    ("epochs=2.5", "epochs"),
    ("epochs=true", "epochs"),
    ("epochs=three", "epochs"),
    ("epochs=--5", "epochs"),
    ("batch_size=[1, 2]", "batch_size"),
    ("lrate=fast", "lrate"),
    ("lrate=nan", "lrate"),
    ("augment=maybe", "augment"),
    ("augment=1", "augment"),
    ("increment=[2, 2.5]", "increment"),
    ("milestones=5", "milestones"),
    ("in_memory=1", "in_memory"),
    ("epochs=0", "epochs"),
    ("lrate=-0.1", "lrate"),
    ("increment=[2, 0]", "increment"),
])
def test_bad_values_are_user_errors_naming_the_key(override, key):
    with pytest.raises(UserError) as exc:
        load_config(None, [override])
    assert f"'{key}'" in str(exc.value)


def test_int_from_string_in_yaml_is_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: '4'\nseed: '3'\n")
    cfg = load_config(path, [])
    assert cfg.epochs == 4 and type(cfg.epochs) is int
    assert cfg.seed == 3


def test_pretrained_values():
    assert load_config(None, ["pretrained=true"]).pretrained is True
    assert load_config(None, ["pretrained=False"]).pretrained is False
    assert build_config({"pretrained": "TRUE"}).pretrained is True
    assert load_config(None, ["pretrained=/w/resnet18.pth"]).pretrained == "/w/resnet18.pth"


def test_auto_bool_values():
    assert load_config(None, ["in_memory=true"]).in_memory == "true"
    assert load_config(None, ["in_memory=AUTO"]).in_memory == "auto"
    assert load_config(None, ["progress=false"]).progress == "false"


def test_lists_and_names():
    cfg = load_config(None, ["increment=[2, 3, 5]", "class_order=[1, 0, 2]", "milestones=[3,6]",
                             "dataset=[digits, breastmnist]"])
    assert cfg.increment == [2, 3, 5]
    assert cfg.class_order == [1, 0, 2]
    assert cfg.milestones == [3, 6]
    assert cfg.dataset == ["digits", "breastmnist"]


def test_seed_int_or_list():
    cfg = load_config(None, ["seed=[1, 2, 3]"])
    assert cfg.seed == [1, 2, 3] and seeds_of(cfg) == [1, 2, 3]
    assert seeds_of(load_config(None, ["seed=5"])) == [5]


def test_nullable_keys_can_be_cleared():
    cfg = load_config(None, ["img_size="])
    assert cfg.img_size is None
    with pytest.raises(UserError, match="'epochs'"):
        load_config(None, ["epochs="])


def test_config_copy_is_deep():
    cfg = load_config(None, ["milestones=[1, 2]"])
    other = cfg.copy()
    other.milestones.append(3)
    assert cfg.milestones == [1, 2]
    assert other.epochs == cfg.epochs
    with pytest.raises(AttributeError):
        cfg.no_such_key


# ---------------------------------------------------------------- overrides


def test_parse_overrides():
    out = parse_overrides(["a=1", "b=x=y", "c=", "d=[1, 2]", " e =0.5", "f=false", "g=1e-3"])
    assert out == {"a": 1, "b": "x=y", "c": None, "d": [1, 2], "e": 0.5, "f": False, "g": "1e-3"}


@pytest.mark.parametrize("item", ["epochs", "=3", " =3"])
def test_malformed_overrides(item):
    with pytest.raises(UserError, match="key=value"):
        parse_overrides([item])


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 9\nbatch_size: 16\n")
    cfg = load_config(path, ["epochs=2"])
    assert cfg.epochs == 2 and cfg.batch_size == 16


# ---------------------------------------------------------------- unknown / method-specific keys


@pytest.mark.parametrize("key, closest", [("lrat", "lrate"), ("epoch", "epochs"), ("memory_sise", "memory_size"),
                                          ("bakbone", "backbone")])
def test_unknown_key_names_the_closest(key, closest):
    with pytest.raises(UserError) as exc:
        load_config(None, [f"{key}=1"])
    msg = str(exc.value)
    assert f"'{key}'" in msg and f"did you mean '{closest}'" in msg


def test_unknown_method_names_the_closest():
    with pytest.raises(UserError, match="did you mean 'replay'"):
        load_config(None, ["method=replai"])


class _KDMethod(Method):
    options = {"T": Option("float", 2.0, "distillation temperature"),
               "lamda": Option("float", 1.0, "distillation weight", min=0.0)}


@pytest.fixture
def kd_method(monkeypatch):
    """A temporary method owning the keys T and lamda."""
    monkeypatch.setitem(METHODS._items, "kdtest", _KDMethod)
    return "kdtest"


def test_method_specific_keys(kd_method):
    cfg = build_config({"method": kd_method, "T": "3"})
    assert cfg.T == 3.0 and cfg.lamda == 1.0
    with pytest.raises(UserError) as exc:
        build_config({"method": "finetune", "T": 2})
    msg = str(exc.value)
    assert "'T'" in msg and "'finetune'" in msg and kd_method in msg
    with pytest.raises(UserError, match="'lamda'"):
        build_config({"method": kd_method, "lamda": -1})
    # the generic keys of other methods are not there
    assert "T" not in build_config({"method": "finetune"})


# ---------------------------------------------------------------- choices


def test_choices_are_validated_and_lowercased():
    assert load_config(None, ["opt_type=AdamW"]).opt_type == "adamw"
    with pytest.raises(UserError) as exc:
        load_config(None, ["opt_type=rmsprop"])
    assert "sgd, adam, adamw" in str(exc.value)
    with pytest.raises(UserError, match="did you mean 'herding'"):
        load_config(None, ["sampling_method=hearding"])
    with pytest.raises(UserError, match="'scheduler'"):
        load_config(None, ["scheduler=step"])


# ---------------------------------------------------------------- reference framework keys


def test_reference_aliases():
    cfg = build_config({"model_name": "finetune_il", "convnet_type": "resnet32", "random_seed": 7, "lr": "0.5",
                        "optimizer": "adam", "image_size": 24})
    assert cfg.method == "finetune"  # alias key and alias method name
    assert cfg.backbone == "resnet32"
    assert cfg.seed == 7
    assert cfg.lrate == 0.5
    assert cfg.opt_type == "adam"
    assert cfg.img_size == 24
    for ref_key in ("model_name", "convnet_type", "random_seed", "lr", "optimizer", "image_size"):
        assert ref_key not in cfg


def test_ignored_reference_keys_give_a_notice():
    notices = []
    cfg = build_config({"method": "finetune", "save_models": True, "apply_nme": False, "epochs": 2}, notices)
    assert cfg.epochs == 2
    assert "save_models" not in cfg and "apply_nme" not in cfg
    assert len(notices) == 2
    assert any("'save_models'" in n for n in notices) and any("'apply_nme'" in n for n in notices)
    assert all("ignored" in n for n in notices)


# ---------------------------------------------------------------- YAML files


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlrate: 0.1\nbatch_size: : 4\n")
    with pytest.raises(UserError) as exc:
        load_config(path, [])
    msg = str(exc.value)
    assert str(path) in msg and "line 3" in msg


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 3\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(path, [])


def test_missing_and_empty_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", [])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    cfg = load_config(empty, [])
    assert cfg.method == "replay" and cfg.dataset == "digits"  # the framework defaults, not the embedded file
    assert cfg.img_size is None


# ---------------------------------------------------------------- legacy (`python main.py`)


REFERENCE = {
    "basic": {"device": "1", "seed": [1993], "dataset": "mymed", "shuffle": True, "method": "finetune_il",
              "method_type": "multi_steps", "eval_metric": "acc", "backbone": "resnet18", "pretrained": False,
              "save_models": True, "memory_size": 2000, "fixed_memory": False, "sampling_method": "herding",
              "split_dataset": True},
    "usual": {"init_cls": 2, "increment": 2},
    "special": {"incre_type": "cil"},
    "options": {
        "mymed": {
            "resnet32": {"epochs": 170, "batch_size": 128, "lrate": 0.1},
            "resnet18": {"img_size": 224, "epochs": 200, "batch_size": 64, "opt_type": "adam",
                         "milestones": [70, 130, 170], "lrate": 0.01},
        },
        "cifar100": {"resnet18": {"epochs": 1}},
    },
}


def test_flatten_reference_config_picks_dataset_and_backbone():
    flat = legacy.flatten_reference_config(REFERENCE)
    assert "basic" not in flat and "options" not in flat
    assert flat["dataset"] == "mymed" and flat["init_cls"] == 2 and flat["incre_type"] == "cil"
    # options[mymed][resnet18], not resnet32 nor cifar100
    assert flat["epochs"] == 200 and flat["batch_size"] == 64 and flat["img_size"] == 224
    assert flat["opt_type"] == "adam" and flat["milestones"] == [70, 130, 170]


def test_flatten_uses_convnet_type_and_per_dataset_options():
    raw = {"basic": {"dataset": "d", "convnet_type": "resnet32"},
           "options": {"d": {"resnet32": {"epochs": 5}, "resnet18": {"epochs": 7}}}}
    assert legacy.flatten_reference_config(raw)["epochs"] == 5
    raw = {"basic": {"dataset": "d", "backbone": "resnet18"}, "options": {"d": {"epochs": 4, "lrate": 0.2}}}
    flat = legacy.flatten_reference_config(raw)
    assert flat["epochs"] == 4 and flat["lrate"] == 0.2
    # top-level keys outside the sections are kept; later sections win
    flat = legacy.flatten_reference_config({"epochs": 1, "basic": {"epochs": 2}, "special": {"epochs": 3}})
    assert flat["epochs"] == 3


def test_flatten_rejects_non_mapping_sections():
    with pytest.raises(UserError, match="'usual'"):
        legacy.flatten_reference_config({"usual": [1, 2]})


def test_reference_config_builds_with_notices():
    notices = []
    raw = legacy.flatten_reference_config(REFERENCE)
    raw["dataset"] = "digits"
    cfg = build_config(raw, notices)
    assert cfg.method == "finetune" and cfg.backbone == "resnet18" and cfg.seed == [1993]
    assert cfg.epochs == 200 and cfg.device == "1"
    ignored = " ".join(notices)
    for key in ("method_type", "eval_metric", "save_models", "fixed_memory", "split_dataset", "incre_type"):
        assert f"'{key}'" in ignored


@pytest.mark.parametrize("value, device", [("0", "cuda:0"), ("1", "cuda:1"), ("0,1", "cuda:0"), (" 2 , 3", "cuda:2"),
                                           ("-1", "cpu"), ("cpu", "cpu"), ("", "cpu"), (3, "cuda:3"),
                                           ("cuda:1", "cuda:1")])
def test_reference_device(value, device):
    assert legacy.reference_device(value) == device


def test_embedded_default_keys_of_another_method_are_dropped_when_the_method_changes():
    from dynammo.configure import load_config

    default = load_config(None, [])
    assert default.method == "dynammo" and default.lrate_finetune == 0.01
    replay = load_config(None, ["method=replay", "memory_size=20"])
    assert replay.method == "replay" and "lrate_finetune" not in replay
    assert replay.img_size == default.img_size  # general keys of the default still apply
    acl = load_config(None, ["method=acl"])
    assert acl.lrate_finetune == 0.01 and "merge_bn" not in acl
