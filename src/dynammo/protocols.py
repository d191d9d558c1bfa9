"""Protocols and method files: what must be equal for a fair comparison, kept apart from what a
method tunes, composed at run time.

    dynammo run -c PROTOCOL -c METHOD [-c MY_FILE.yaml ...] [key=value ...]

- A *protocol* (`configs/protocols/<name>.yaml` inside the package, or a user's file with a
  `protocol: NAME` key) holds only PROTOCOL_KEYS: data, split, class order and seeds, task sizes,
  backbone and weights, image size and normalisation, memory budget and policy, the headline metric
  and the training budget. A protocol file that sets any other key is refused.
- A *method file* (`configs/methods/<method>/<protocol>.yaml`, else `.../default.yaml`) holds only the
  method's own keys and its optimiser and stage schedules. Naming a method (`-c dynammo` or
  `method=dynammo`) with a shipped protocol applies the method's shipped file for that protocol.
- Order: the protocol first, then the method's file, then the other files in the order given, then
  `key=value` (later wins). A key of the protocol that a later layer sets is reported, and the run's
  results.json records which protocol keys it changed.

results.json records the protocol by name and by a hash of the values that were actually used, so
runs under different values are never taken for the same protocol.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dynammo.config import ALIASES, NEUTRAL, OPTIONS, PROTOCOL, coerce, shown
from dynammo.config_yaml import parse_overrides, read_yaml
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.registry import closest

CONFIG_DIR = Path(__file__).parent / "configs"
PROTOCOL_DIR = CONFIG_DIR / "protocols"
METHOD_DIR = CONFIG_DIR / "methods"
DEFAULT_PROTOCOL, DEFAULT_METHOD = "digits", "dynammo"  # the embedded default: `dynammo run`

# The key lists below are derived from the role each key declares on its Option (config.py).
# What must be equal for every method compared under one protocol.
PROTOCOL_KEYS = tuple(key for key, opt in OPTIONS.items() if opt.role == PROTOCOL)
# Keys that shape one backbone only: part of the protocol (and its hash) when that backbone runs.
BACKBONE_SHAPE_KEYS = {key: opt.backbone_only for key, opt in OPTIONS.items() if opt.backbone_only}
# Also allowed in a protocol file: its name and where the data is (not part of the comparison).
PROTOCOL_FILE_EXTRA = tuple(key for key, opt in OPTIONS.items() if opt.in_protocol_file)
# Not hashed: the seed varies between the runs of one protocol (each results.json records its own).
UNHASHED = tuple(key for key in PROTOCOL_KEYS if OPTIONS[key].hashed == "never")
# Keys that do not change what a run computes (where it runs, what it prints or logs, how often it
# saves): a resume or a sweep may change them; every other key makes another experiment.
RESULT_NEUTRAL_KEYS = {key for key, opt in OPTIONS.items() if opt.role == NEUTRAL}
# Keys added after protocols were first hashed: part of the values (and the hash) only when set away
# from their default, so a protocol that does not use them keeps the hash its earlier runs recorded.
HASHED_WHEN_SET = tuple(key for key in PROTOCOL_KEYS if OPTIONS[key].hashed == "when_set")


@dataclass
class Layer:
    label: str  # how the log names it: "protocol mednist_cpu", "method file replay/mednist_cpu.yaml", ...
    kind: str  # protocol | method | file | overrides
    values: dict


def _canonical_keys(raw: dict) -> dict:
    return {ALIASES.get(k, k): v for k, v in raw.items()}


def protocol_names() -> List[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_path(name: str) -> Path:
    return PROTOCOL_DIR / f"{name}.yaml"


def describe(path: Path) -> str:
    """The first comment line of a shipped file (what `dynammo list` shows)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            text = text.split(": ", 1)[1] if text.startswith(path.stem + ":") else text
            return text.split("; ")[0]
    return ""


def shipped_method_file(method: str, protocol: Optional[str]) -> Optional[Path]:
    folder = METHOD_DIR / method
    for name in ([protocol] if protocol else []) + ["default"]:
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def methods_tuned_for(protocol: str) -> List[str]:
    return sorted(p.parent.name for p in METHOD_DIR.glob(f"*/{protocol}.yaml"))


def untuned_reason(cfg) -> Optional[str]:
    """Why a run under a shipped protocol trains with the framework's generic optimiser settings (no
    `configs/methods/<method>/<protocol>.yaml` ships its paper's settings for that protocol), else None."""
    protocol, method = cfg.get("protocol"), cfg.get("method")
    if protocol not in protocol_names() or (METHOD_DIR / str(method) / f"{protocol}.yaml").is_file():
        return None
    return (f"no method file configs/methods/{method}/{protocol}.yaml: {method} ran under protocol {protocol} with "
            "the generic optimiser and schedule (and any keys given), not settings tuned for it")


def check_protocol_values(values: dict, label: str) -> None:
    """A protocol holds only what must be equal across methods."""
    allowed = set(PROTOCOL_KEYS) | set(PROTOCOL_FILE_EXTRA)
    for key in values:
        if key not in allowed:
            what = "a method key" if key not in OPTIONS else "not a protocol key"
            raise UserError(f"{label} sets '{key}', {what}; a protocol holds only {', '.join(PROTOCOL_KEYS)} "
                            "(put method and optimiser keys in a method file)")


def read_protocol(name: str) -> dict:
    path = protocol_path(name)
    values = _canonical_keys(read_yaml(path))
    values.setdefault("protocol", name)
    check_protocol_values(values, f"protocol {name} ({path})")
    return values


def _method_canonical(name) -> str:
    return METHODS.canonical(str(name))


def _is_method(name: str) -> bool:
    try:
        METHODS.canonical(name)
        return True
    except UserError:
        return False


def _load_source(source: str) -> Layer:
    """One `-c` argument: a YAML path, a shipped protocol's name, or a method's name."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        values = _canonical_keys(read_yaml(path))
        # a protocol file names its protocol and no method; a run's config.yaml names both (a full config)
        if values.get("protocol") is not None and "method" not in values:
            check_protocol_values(values, f"protocol file {path}")
            return Layer(f"protocol {values['protocol']} ({path})", "protocol", values)
        return Layer(f"config file {path}", "file", values)
    if source in protocol_names():
        return Layer(f"protocol {source}", "protocol", read_protocol(source))
    if _is_method(source):
        return Layer(f"method {_method_canonical(source)}", "method", {"method": _method_canonical(source)})
    raise UserError(f"-c {source}: no such file, protocol or method; protocols: {', '.join(protocol_names())}"
                    f"{closest(source, protocol_names())} (or give a method name or the path of a YAML file)")


def compose(sources: Sequence[str], overrides: Sequence[str] = (), extra: Optional[dict] = None,
            notices: Optional[list] = None) -> dict:
    """The raw config of `-c` sources + overrides (not yet validated; see configure.build_config)."""
    notices = notices if notices is not None else []
    layers = [_load_source(s) for s in sources]
    if not layers:  # the embedded default
        layers = [Layer(f"protocol {DEFAULT_PROTOCOL}", "protocol", read_protocol(DEFAULT_PROTOCOL))]
    user = _canonical_keys(dict(extra or {}))
    user.update(_canonical_keys(parse_overrides(overrides)))
    protocols = [layer for layer in layers if layer.kind == "protocol"]
    if len(protocols) > 1:
        raise UserError(f"two protocols given ({protocols[0].label} and {protocols[1].label}); "
                        "a run follows one protocol: give one -c PROTOCOL")
    protocol = protocols[0] if protocols else None
    others = [layer for layer in layers if layer is not protocol]

    method = user.get("method")
    if method is None:  # the last file that names one
        for layer in others:
            method = layer.values.get("method", method)
    if method is None and protocol is not None:
        if sources:
            raise UserError(f"{protocol.label} names no method; add -c METHOD (e.g. -c dynammo) or method=NAME")
        method = DEFAULT_METHOD
    ordered = ([protocol] if protocol else [])
    if method is not None and protocol is not None:
        method = _method_canonical(method)
        tuned = shipped_method_file(method, protocol.values.get("protocol"))
        if tuned is not None:
            values = _canonical_keys(read_yaml(tuned))
            values.setdefault("method", method)
            ordered.append(Layer(f"method file {tuned.parent.name}/{tuned.name}", "method", values))
        ordered.append(Layer(f"method {method}", "method", {"method": method}))
    ordered += [layer for layer in others if not (layer.kind == "method" and set(layer.values) == {"method"})]
    ordered.append(Layer("the command line", "overrides", user))

    raw: dict = {}
    for layer in ordered:
        if protocol is not None and layer is not protocol:
            _report_protocol_keys(protocol, layer, notices)
        raw.update(layer.values)
    return raw


def _report_protocol_keys(protocol: Layer, layer: Layer, notices: list) -> None:
    """A key of the protocol set again by a method file, a config file or the command line."""
    name = protocol.values.get("protocol")
    for key, value in layer.values.items():
        if key not in PROTOCOL_KEYS or key not in protocol.values:
            continue
        theirs = protocol.values[key]
        if key == "seed" and _seed_subset(value, theirs):
            continue  # running some of the protocol's seeds is still the protocol
        if value == theirs:
            notices.append(f"note: {layer.label} repeats protocol key {key}={shown(value)} of protocol {name}")
        else:
            notices.append(f"note: {layer.label} sets protocol key {key}={shown(value)} (protocol {name}: {shown(theirs)}); "
                           f"this run departs from protocol {name}, and results.json says so")


def _seed_subset(value, protocol_seeds) -> bool:
    ours = value if isinstance(value, list) else [value]
    theirs = protocol_seeds if isinstance(protocol_seeds, list) else [protocol_seeds]
    return all(s in theirs for s in ours)


def _comparable(key: str, value):
    if key == "pretrained" and isinstance(value, str):
        return Path(value).name  # the same weights file in another folder is the same protocol
    return value


def protocol_values(cfg) -> Dict[str, object]:
    return {k: _comparable(k, cfg.get(k)) for k in PROTOCOL_KEYS
            if k not in UNHASHED and BACKBONE_SHAPE_KEYS.get(k, cfg.get("backbone")) == cfg.get("backbone")
            and not (k in HASHED_WHEN_SET and cfg.get(k, OPTIONS[k].default) == OPTIONS[k].default)}


def protocol_hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def protocol_record(cfg) -> dict:
    """What results.json says of the protocol: its name, the values used, their hash, and each key where
    the run departs from the shipped protocol of that name."""
    values = protocol_values(cfg)
    record = {"name": cfg.get("protocol"), "hash": protocol_hash(values), "values": values, "departs": {}}
    name = cfg.get("protocol")
    if name in protocol_names():
        shipped = read_protocol(name)
        for key in values:
            want = _comparable(key, coerce(key, OPTIONS[key], shipped[key]) if key in shipped else OPTIONS[key].default)
            if want != values[key]:
                record["departs"][key] = {"protocol": want, "run": values[key]}
    return record
