"""What a file written by `dynammo export` may hold, checked before torch reads any of it.

A `torch.export` archive is a zip of JSON (the program), raw tensor bytes and a few pickles, and
`torch.export.load` runs code from several of its entries: weights or constants marked `use_pickle`
in their config JSON are unpickled without the weights-only check; the sample inputs fall back to a
full unpickle when the weights-only one fails; `custom_obj_`/`opaque_obj_` constants and legacy
`data/weights/<model>.pt` files are unpickled; `data/aotinductor/` holds a compiled library; the
program's `guards_code` is exec'd when its module is built; its symbolic expressions go through
`sympy.sympify` (an eval); and a node's target is any attribute path under `torch`.

An export of dynammo holds none of that: raw weights, an ATen graph, plain-tensor sample inputs.
So the archive is read with torch's own zip reader (the one `torch.export.load` uses, so both see
the same entries) and refused, naming the entry, unless every entry is of that kind.
"""
from __future__ import annotations

import io
import json
import re
from typing import Iterator, List

import torch

from dynammo.errors import UserError

MODEL = "model"  # torch.export.save writes one program under this name
FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                 f"models/{MODEL}.json", f"data/weights/{MODEL}_weights_config.json",
                 f"data/constants/{MODEL}_constants_config.json", f"data/sample_inputs/{MODEL}.pt"}
ENTRY_PATTERNS = (re.compile(r"data/weights/weight_\d+"), re.compile(r"data/constants/tensor_\d+"),
                  re.compile(r"extra/[\w.-]+"))  # extra files are read as text only
# node targets that are plain tensor or integer arithmetic: ATen operators and Python's operator module
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.\w+\.\w+")
_OPERATOR_TARGETS = {f"_operator.{name}" for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
    "le", "gt", "ge", "and_", "or_", "not_", "lshift", "rshift")}
# a symbolic size is sympy's srepr of integer arithmetic over symbols: nothing else may reach sympify
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "true", "false", "True", "False", "oo", "Infinity",
    "NegativeInfinity", "Half", "One", "Zero", "NegativeOne", "BooleanTrue", "BooleanFalse",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity",
    # assumptions written as keywords: Symbol('s0', positive=True, integer=True)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "zero",
    "even", "odd", "rational", "commutative", "extended_real", "extended_positive", "extended_negative",
    "extended_nonnegative", "extended_nonpositive", "extended_nonzero", "infinite", "prime", "composite"}
_EXPR_TOKEN = re.compile(r"\s+|'[A-Za-z_][A-Za-z0-9_]*'|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?(?:e[+-]?\d+)?"
                         r"|\*\*|[-+*/%(),=<>]")
_MAX_EXPR_CHARS = 4096


class HostileArchive(UserError):
    """An exported model holding something torch would execute or unpickle."""


def refuse(source, entry: str, what: str) -> HostileArchive:
    return HostileArchive(f"{source}: entry {entry} {what}; refusing to load it (a model written by `dynammo export` "
                          "holds only tensors and an ATen program: export it again, or ask its sender to)")


def check_export_archive(data: bytes, source) -> dict:
    """Check the bytes of an exported model; returns its extra files {name: text} (dynammo.json).
    Raises UserError naming `source` and the offending entry."""
    from torch.export.pt2_archive import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names: List[str] = reader.get_file_names()
    except Exception as exc:  # torch raises RuntimeError or AssertionError for a file that is not an archive
        raise UserError(f"{source} is not a model written by `dynammo export` ({exc.__class__.__name__})") from None
    legacy_zip_entries(data, source)
    for name in names:
        if name not in FIXED_ENTRIES and not any(p.fullmatch(name) for p in ENTRY_PATTERNS):
            raise refuse(source, name, "is not part of an exported program (torch would unpickle or run it)")
    for name in FIXED_ENTRIES - {".data/serialization_id", "byteorder"}:
        if name not in names:
            raise UserError(f"{source} is not a complete model written by `dynammo export` (no entry {name})")
    check_payload_config(reader, f"data/weights/{MODEL}_weights_config.json", "weight_", source)
    check_payload_config(reader, f"data/constants/{MODEL}_constants_config.json", "tensor_", source)
    check_sample_inputs(reader.read_bytes(f"data/sample_inputs/{MODEL}.pt"), f"data/sample_inputs/{MODEL}.pt",
                        source)
    check_program(read_json(reader, f"models/{MODEL}.json", source), f"models/{MODEL}.json", source)
    return {name[len("extra/"):]: reader.read_string(name) for name in names if name.startswith("extra/")}


def legacy_zip_entries(data: bytes, source) -> None:
    """torch.export.load falls back to its pre-2.7 format (pickled state dict and sample inputs) when a
    zip reader sees a top-level `version`; Python's zip reader is the one that fallback uses."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            top = [n for n in zf.namelist() if n == "version" or n.startswith("serialized_")]
    except (zipfile.BadZipFile, ValueError, OSError):
        return  # the fallback cannot open it either
    if top:
        raise refuse(source, top[0], "belongs to torch's older pickled export format")


def read_json(reader, entry: str, source):
    try:
        return json.loads(reader.read_string(entry))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise refuse(source, entry, f"is not valid JSON ({exc.__class__.__name__})") from None


def check_payload_config(reader, entry: str, prefix: str, source) -> None:
    """Weights and constants are raw tensor bytes: none marked to be unpickled, none a custom object."""
    config = read_json(reader, entry, source)
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise refuse(source, entry, "is not a payload config")
    for fqn, meta in items.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise refuse(source, entry, f"marks {fqn!r} to be unpickled")
        if not re.fullmatch(re.escape(prefix) + r"\d+", str(meta.get("path_name"))):
            raise refuse(source, entry, f"stores {fqn!r} as {meta.get('path_name')!r}, not as raw tensor bytes")


def check_sample_inputs(data: bytes, entry: str, source) -> None:
    """(args, kwargs) of plain tensors, readable by torch's weights-only unpickler (torch reads it
    that way first and unpickles fully only when that fails)."""
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses globals with UnpicklingError, and more
        raise refuse(source, entry, f"is a pickle beyond plain tensors ({exc.__class__.__name__})") from None
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif not isinstance(v, torch.Tensor):
            raise refuse(source, entry, f"holds a {type(v).__name__}, not plain tensors")


def json_dicts(value) -> Iterator[dict]:
    """Every dict inside a parsed JSON value (iteratively: the nesting depth is the file's)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            yield v
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_program(program, entry: str, source) -> None:
    """No guard code (exec'd), only ATen and arithmetic node targets, only integer-arithmetic
    symbolic expressions (sympified)."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise refuse(source, entry, "is not an exported program")
    if program.get("guards_code"):
        raise refuse(source, entry, "holds guard code, which torch would execute")
    for d in json_dicts(program):
        target = d.get("target")
        if "inputs" in d and "outputs" in d and target is not None:
            if not (isinstance(target, str) and (_ATEN_TARGET.fullmatch(target) or target in _OPERATOR_TARGETS)):
                raise refuse(source, entry, f"calls {str(target)[:80]!r}, not an ATen operator")
        expr = d.get("expr_str")
        if expr is not None and not safe_expression(expr):
            raise refuse(source, entry, f"holds the symbolic expression {str(expr)[:80]!r}, not integer arithmetic")


def safe_expression(expr) -> bool:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS or "__" in expr:
        return False
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            return False
        token = m.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _SYMPY_NAMES:
            return False
        pos = m.end()
    return True
