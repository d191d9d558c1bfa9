"""Config text -> plain values: YAML files and `key=value` overrides, read with bounds on their size
(a config is a few kB of key: value lines; YAML aliases and merge keys could make it billions of items)."""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterable

import yaml

from dynammo.config import shown
from dynammo.errors import UserError

# Bounds on one config value before anything formats, compares or copies it: YAML aliases let a
# 370-byte file stand for a value of billions of items (each use of an alias counts again here).
MAX_VALUE_ITEMS = 100_000
MAX_VALUE_CHARS = 1_000_000
MAX_VALUE_DEPTH = 32
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kB of key: value lines


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
