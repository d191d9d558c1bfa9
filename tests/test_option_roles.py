"""Each config key declares its role once, on its Option: the protocol's key lists derive from it (and the
protocol hashes recorded in results.json stay what they were), and every training stage has the full key set."""
from __future__ import annotations

import pytest

from dynammo.config import OPTIONS
from dynammo.configure import load_config
from dynammo.methods import METHODS
from dynammo.optim import STAGE_KEYS, OptimSettings
from dynammo.protocols import (BACKBONE_SHAPE_KEYS, HASHED_WHEN_SET, PROTOCOL_FILE_EXTRA, PROTOCOL_KEYS,
                               RESULT_NEUTRAL_KEYS, UNHASHED, protocol_names, protocol_record)

# The hash of every shipped protocol (method replay) as results.json recorded it before the key roles
# moved onto the Options: deriving the key lists must not change one.
RECORDED_HASHES = {
    "cifar100_acl": "05691daea0d3",
    "cifar100_b50": "8abb43158725",
    "cifar100_coda": "185a6a221425",
    "cifar100_der": "620a151c0bc5",
    "cifar100_icarl": "7483505c76f0",
    "cifar100_l2p": "5f756dbc276a",
    "cifar100_wa": "4f2db26947a5",
    "cub200_icarl": "3f55dcb6ac9a",
    "digits": "67b241afb4fb",
    "digits_vit": "673beab66dfd",
    "imagenet1000_bic": "60c83b0c0242",
    "imagenet100_b0": "7e9bc7919bad",
    "imagenet_r_b0": "0e9f95836e7e",
    "imagenet_r_coda": "35670c383491",
    "imagenet_r_dualprompt": "70436f952957",
    "medmnist4": "49c6c31bb848",
    "mednist": "58ccda86851b",
    "mednist_cpu": "83ca15803e2d",
    "mednist_lite0": "7677c9fb773a",
    "mednist_lite0_1class": "fc8190254fda",
    "mednist_vit_cpu": "cadc51a219f6",
    "path16_acl": "bf6fb0f0aa75",
    "pathmnist_lite0": "80125d912367",
    "skin40_scratch": "bb2c3a7c5f86",
    "skin8_acl": "bfa82fa790fc",
    "skin8_scratch": "c4c2d017d098",
}


def stage_suffixes(options) -> set:
    """The suffixes of a method's stage keys: `epochs_finetune` -> `_finetune`."""
    return {key[len(base):] for key in options for base in STAGE_KEYS if key.startswith(base + "_")}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_stage_of_every_method_has_the_full_key_set(method):
    options = METHODS.get(method).options
    for suffix in stage_suffixes(options):
        assert {key + suffix for key in STAGE_KEYS} <= set(options), (method, suffix)


def test_podnet_fine_tuning_weight_decay_defaults_to_the_general_one():
    cfg = load_config(["digits", "podnet"], ["weight_decay=0.003"])
    assert cfg.weight_decay_finetune is None
    assert OptimSettings.from_config(cfg, "_finetune").weight_decay == 0.003


def test_the_key_roles_give_the_lists_they_replace():
    assert "eval_batch_size" in RESULT_NEUTRAL_KEYS  # a resume or a sweep may change it
    assert set(PROTOCOL_KEYS) == {
        "dataset", "backbone", "pretrained", "img_size", "normalize", "augment", "augment_crop", "test_crop",
        "keep_aspect", "init_cls", "increment", "shuffle", "shuffle_rule", "class_order", "seed", "test_fraction",
        "max_train_per_class", "max_test_per_class", "memory_size", "memory_per_class", "epochs", "init_epochs",
        "batch_size", "metric", "vit_patch_size", "vit_embed_dim", "vit_depth", "vit_heads"}
    assert RESULT_NEUTRAL_KEYS == {
        "device", "progress", "num_workers", "data_root", "download", "in_memory", "plots", "tensorboard", "tracking",
        "mlflow_uri", "mlflow_experiment", "checkpoint_every", "save_checkpoints", "eval_batch_size"}
    assert BACKBONE_SHAPE_KEYS == {key: "vit_cpu" for key in ("vit_patch_size", "vit_embed_dim", "vit_depth",
                                                             "vit_heads")}
    assert set(PROTOCOL_FILE_EXTRA) == {"protocol", "data_root", "download", "in_memory", "num_workers"}
    assert set(UNHASHED) == {"seed"}
    assert set(HASHED_WHEN_SET) == {"augment_crop", "test_crop", "keep_aspect", "shuffle_rule"}
    assert not set(PROTOCOL_KEYS) & RESULT_NEUTRAL_KEYS
    assert all(OPTIONS[key].role == "protocol" for key in BACKBONE_SHAPE_KEYS)


def test_the_shipped_protocols_keep_their_recorded_hashes():
    assert set(RECORDED_HASHES) <= set(protocol_names())
    for name, recorded in RECORDED_HASHES.items():
        assert protocol_record(load_config([name, "replay"]))["hash"] == recorded, name
