"""A run's validated Config: the `-c` sources composed (protocols.py) and every key checked against
the framework's options (config.py) and the method's own (`Method.options`)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Iterable, Optional

from dynammo.config import ALIASES, IGNORED_REFERENCE_KEYS, OPTIONS, Config, Option, coerce, shown
from dynammo.config_yaml import check_mapping_values
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.protocols import compose
from dynammo.registry import closest


def method_options(method: str) -> Dict[str, Option]:
    return METHODS.get(method).options


def all_method_options() -> Dict[str, list]:
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
    if sources is None:
        sources = []
    elif isinstance(sources, (str, Path)):
        sources = [str(sources)]
    return build_config(compose([str(s) for s in sources], overrides, extra, notices), notices)
