"""Every config key's value is checked by the range its `Option` declares, by a property (hypothesis),
not by a list of cases: any value of any key either builds a config that holds to its declared
type and range, or stops with one `UserError` line naming the key; a run that gets past the config
either prepares (data, scenario, method) or stops with one line. The keys are discovered from the
registries, so a new key or method is covered without editing this file."""
from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynammo.data as data_module
from dynammo import cli
from dynammo.config import OPTIONS, Option
from dynammo.configure import build_config
from dynammo.console import Console
from dynammo.errors import UserError
from dynammo.methods import METHODS
from dynammo.run.build import prepare
from method_helpers import DIGITS_8PX, cli_args

# Reproducible in CI: derandomized examples, no deadline (the first prepare of a method is slow).
PROPERTY = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# (method, key, option): the framework's keys under one method, every method's own keys under it
KEYS = [("replay", k, o) for k, o in OPTIONS.items()] + [
    (m, k, o) for m in METHODS.names() for k, o in METHODS.get(m).options.items()]
KEY_IDS = [f"{m}:{k}" for m, k, _ in KEYS]

# the smallest run that prepares every method on the bundled digits
TINY = dict(DIGITS_8PX, max_train_per_class=2, max_test_per_class=1, memory_size=20, device="cpu", progress="false",
            epochs=1, tensorboard=False, plots=False, save_checkpoints=False)
METHOD_BASE = {"gem": {"opt_mom": 0.0}}  # GEM refuses momentum (the projected gradient)


pytestmark = pytest.mark.usefixtures("single_thread_module")


# ---- strategies, from the Option's declaration only ----
def _int_bounds(opt: Option):
    lo = None if opt.min is None else (math.floor(opt.min) + 1 if opt.min_open else math.ceil(opt.min))
    hi = None if opt.max is None else (math.ceil(opt.max) - 1 if opt.max_open else math.floor(opt.max))
    if opt.sane_max is not None:  # the sanity bound of an integer key without a declared max
        hi = int(opt.sane_max) if hi is None else min(hi, int(opt.sane_max))
    return lo, hi


def _number(opt: Option, kind: str):
    if kind == "int":
        lo, hi = _int_bounds(opt)
        return st.integers(min_value=lo, max_value=hi)
    return st.floats(min_value=opt.min, max_value=opt.max, exclude_min=opt.min_open and opt.min is not None,
                     exclude_max=opt.max_open and opt.max is not None, allow_nan=False, allow_infinity=False)


def valid_values(opt: Option):
    """Values the declaration allows (the config must accept every one)."""
    k = opt.kind
    if k in ("int", "float"):
        s = _number(opt, k)
    elif k == "bool":
        s = st.booleans()
    elif k == "str":
        s = st.sampled_from(opt.choices).flatmap(lambda c: st.sampled_from([c, c.upper()])) if opt.choices \
            else st.text(max_size=12)
    elif k in ("int_list", "float_list", "str_list"):
        item = _number(opt, k[:-5]) if k != "str_list" else (
            st.sampled_from(opt.choices) if opt.choices else st.text(max_size=6))
        s = st.lists(item, min_size=1 if opt.nonempty else 0, max_size=5, unique=opt.unique)
    elif k == "int_or_list":
        s = st.one_of(_number(opt, "int"),
                      st.lists(_number(opt, "int"), min_size=1 if opt.nonempty else 0, max_size=4, unique=opt.unique))
    elif k == "str_or_list":
        s = st.one_of(st.text(max_size=8), st.lists(st.text(max_size=6), min_size=1 if opt.nonempty else 0,
                                                    max_size=3, unique=opt.unique))
    elif k == "auto_bool":
        s = st.sampled_from(["auto", "true", "false", "AUTO", True, False])
    elif k == "pretrained":
        s = st.one_of(st.booleans(), st.sampled_from(["true", "false", "False"]))
    else:  # pragma: no cover - a new kind needs a strategy here
        raise AssertionError(f"no strategy for option kind {k}")
    if opt.nullable or opt.default is None:
        s = st.one_of(st.none(), s)
    return s


def edge_values(opt: Option) -> list:
    """Numbers at, just inside and just outside each declared bound."""
    vals = []
    for b in (opt.min, opt.max):
        if b is not None:
            vals += [b, b - 1, b + 1, b - 1e-9, b + 1e-9, b - 0.5, b + 0.5, int(b), -int(b) - 1, str(b)]
    return vals


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-10**30, max_value=-1),
    st.integers(min_value=2**31, max_value=10**400), st.floats(),  # nan, inf, huge, tiny, negative
    st.text(max_size=8),
    st.sampled_from(["", " ", "abc", "1e400", "-1", "-0.0", "nan", "inf", "-inf", "1,2", "[1]", "none", "0x10",
                     "2.5", "1e-3", "True", "AUTO", "\n", "3 4"]),
    st.lists(st.one_of(st.integers(min_value=-5, max_value=10**20), st.floats(), st.text(max_size=3), st.none(),
                       st.booleans()), max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.tuples(st.integers(), st.integers()),
)


def any_value(opt: Option):
    return st.one_of(valid_values(opt), st.sampled_from(edge_values(opt) or [None]), JUNK)


# ---- what an accepted value must satisfy ----
def conforms(opt: Option, v) -> bool:
    if v is None:
        return opt.nullable or opt.default is None

    def number(x, kind):
        if isinstance(x, bool):
            return False
        if kind == "int" and not isinstance(x, int):
            return False
        if kind == "float" and not (isinstance(x, float) and math.isfinite(x)):
            return False
        return opt.in_range(x)

    def text(x):
        return isinstance(x, str) and (not opt.choices or x in opt.choices)

    def listed(x, item):
        return (isinstance(x, list) and all(item(i) for i in x) and (x or not opt.nonempty)
                and (not opt.unique or len(set(map(repr, x))) == len(x)))

    k = opt.kind
    if k in ("int", "float"):
        return number(v, k)
    if k == "bool":
        return isinstance(v, bool)
    if k == "str":
        return text(v)
    if k in ("int_list", "float_list"):
        return listed(v, lambda x: number(x, k[:-5]))
    if k == "str_list":
        return listed(v, text)
    if k == "int_or_list":
        return number(v, "int") or listed(v, lambda x: number(x, "int"))
    if k == "str_or_list":
        return isinstance(v, str) or listed(v, lambda x: isinstance(x, str))
    if k == "auto_bool":
        return v in ("auto", "true", "false")
    if k == "pretrained":
        return isinstance(v, (bool, str))
    raise AssertionError(f"unknown kind {k}")


def assert_one_line_naming(exc: UserError, key: str) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert key in msg, f"the message does not name '{key}': {msg}"


def build(method: str, key: str, value):
    raw = {"method": method, **METHOD_BASE.get(method, {})}
    raw[key] = value
    return build_config(raw)


# ---- the properties ----
def test_every_key_is_covered():
    """A range on every numeric key (an unbounded number is a decision, not an omission)."""
    unbounded = [f"{m}:{k}" for m, k, o in KEYS
                 if o.kind in ("int", "float", "int_list", "float_list", "int_or_list") and o.min is None
                 and o.max is None]
    assert not unbounded, f"numeric keys without a declared range: {unbounded}"


@pytest.mark.parametrize("method,key,opt", KEYS, ids=KEY_IDS)
@settings(**PROPERTY, max_examples=30)
@given(data=st.data())
def test_any_value_is_accepted_in_range_or_refused_in_one_line(method, key, opt, data):
    value = data.draw(any_value(opt), label=key)
    try:
        cfg = build(method, key, value)
    except UserError as exc:
        assert_one_line_naming(exc, key)
        return
    stored = cfg[key]
    if key == "method":
        assert stored in METHODS.names()
    else:
        assert conforms(opt, stored), f"{key}={value!r} was accepted as {stored!r}, outside its declaration"


@pytest.mark.parametrize("method,key,opt", KEYS, ids=KEY_IDS)
@settings(**PROPERTY, max_examples=15)
@given(data=st.data())
def test_declared_values_are_accepted(method, key, opt, data):
    if key == "method":
        value = data.draw(st.sampled_from(METHODS.names()))
    else:
        value = data.draw(valid_values(opt), label=key)
    cfg = build(method, key, value)
    assert conforms(opt, cfg[key])


@pytest.mark.parametrize("method,key,opt", KEYS, ids=KEY_IDS)
@settings(**PROPERTY, max_examples=10)
@given(data=st.data())
def test_a_run_prepares_or_stops_in_one_line(method, key, opt, data, monkeypatch_module):
    """Past the config, the data, scenario and method either build or stop with one line (the
    runner's `prepare`, which runs before anything is written)."""
    value = data.draw(st.one_of(valid_values(opt), JUNK) if key != "method" else st.sampled_from(METHODS.names()),
                      label=key)
    raw = {**TINY, "method": method, **METHOD_BASE.get(method, {}), key: value}
    try:
        cfg = build_config(raw)
    except UserError as exc:
        assert_one_line_naming(exc, key)
        return
    if isinstance(cfg.seed, list):  # the runner prepares one seed at a time
        cfg["seed"] = cfg.seed[0]
    try:
        prepare(cfg, Console(progress="false", quiet=True))
    except UserError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """1 GiB of memory for the prepare property: big sizes stop at the memory check, quickly."""
    mp = pytest.MonkeyPatch()
    mp.setattr(data_module, "available_memory", lambda: 1024**3)
    yield mp
    mp.undo()


# ---- the real command line ----
CLI_TINY = cli_args(TINY, method="replay")
# representative keys: ints, floats, open and closed bounds, lists, choices
CLI_KEYS = ["seed", "img_size", "test_fraction", "lrate", "opt_mom", "epochs", "batch_size", "increment",
            "class_order", "lrate_decay", "opt_type", "memory_size"]


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def bad_override(opt: Option):
    """An override the declaration refuses, as it is typed on the command line."""
    outside = [x for x in edge_values(opt) if isinstance(x, (int, float)) and not opt.in_range(x)]
    nums = [repr(x) for x in outside if not (opt.kind.startswith("int") and isinstance(x, float))]
    wrong = ["abc", "[1, abc]", "1e400", "{a: 1}", "''"] if not opt.choices else ["nonsense", "1"]
    return st.sampled_from(nums + wrong + (["[]"] if opt.nonempty else []) + (["[1, 1]"] if opt.unique else []))


@pytest.mark.parametrize("key", CLI_KEYS)
@settings(**PROPERTY, max_examples=4)
@given(data=st.data())
def test_cli_refuses_a_bad_value_in_one_line_and_writes_nothing(key, data):
    value = data.draw(bad_override(OPTIONS[key]), label=key)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        # the override after an option, as users type it
        code, _, err = run_main(["run", "--out", str(out), *CLI_TINY, "--device", "cpu", f"{key}={value}"])
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (key, value, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
        assert "Traceback" not in err
        assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))


# ---- the four cases of the issue, explicitly ----
def test_negative_seed_is_one_line():
    for seed in (-1, [1, -2]):
        with pytest.raises(UserError, match="'seed' must be in \\[0, 4294967295\\], got -"):
            build_config({"seed": seed})


def test_test_fraction_outside_zero_one_is_refused():
    for bad in (0, 0.0, 1, 1.5, -0.2):
        with pytest.raises(UserError, match="'test_fraction' must be in \\(0, 1\\)"):
            build_config({"test_fraction": bad})
    assert build_config({"test_fraction": 0.5}).test_fraction == 0.5


def test_huge_img_size_names_the_key_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(["run", "--out", str(out), *CLI_TINY, "img_size=100000"])
    assert code == 2 and err.count("\n") == 1 and "img_size" in err, err
    assert not out.exists()


def test_an_img_size_that_cannot_be_allocated_names_the_key(tmp_path, monkeypatch):
    """In range, but more than the machine holds: checked up front, before anything is written."""
    monkeypatch.setattr(data_module, "available_memory", lambda: 1024**3)
    out = tmp_path / "run"
    code, _, err = run_main(["run", "--out", str(out), *CLI_TINY, "img_size=4096", "max_train_per_class=20"])
    assert code == 2 and err.count("\n") == 1 and "img_size=4096" in err, err
    assert not out.exists()


def test_an_allocation_failure_while_resizing_names_the_key(monkeypatch):
    from dynammo.data.imageset import ImageSet

    def fail(self, size):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ImageSet, "resized", fail)
    cfg = build_config({**TINY, "method": "replay"})
    with pytest.raises(UserError, match="img_size=8 cannot be allocated"):
        prepare(cfg, Console(progress="false", quiet=True))


def test_out_of_memory_in_training_or_evaluation_names_the_batch_key():
    cfg = build_config({**TINY, "method": "replay"})
    _, scenario, engine, method = prepare(cfg, Console(progress="false", quiet=True))

    def oom(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(UserError, match="eval_batch_size=256, img_size=8"):  # the evaluation's pass
        engine.apply(oom, scenario.test, batch_size=cfg.eval_batch_size)
    with pytest.raises(UserError, match=r"internal batch of 256 images \(features that feed training\), img_size=8, "
                                        r"backbone resnet20; lower img_size$"):  # a pass that feeds training: no key sizes it
        engine.apply(oom, scenario.test)
    with pytest.raises(RuntimeError, match="a bug"):  # any other error still raises
        engine.apply(lambda x: (_ for _ in ()).throw(RuntimeError("a bug")), scenario.test)


def test_overrides_after_an_option_are_accepted():
    parser = cli.build_parser()
    args = cli.parse_command_line(parser, ["run", "method=replay", "--device", "cpu", "epochs=1"])
    assert args.overrides == ["method=replay", "epochs=1"] and args.device == "cpu"
    args = cli.parse_command_line(parser, ["cost", "a=1", "--json", "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.json
    # reaches the config: a bad value after an option is the config's one line, not argparse's
    code, _, err = run_main(["run", "method=replay", "--device", "cpu", "epochs=0"])
    assert code == 2 and "config key 'epochs' must be >= 1" in err, err
    # a genuinely unknown option, or an override for a command without any, is still argparse's error
    for argv in (["run", "--device", "cpu", "--epochs", "1"], ["eval", "somewhere", "epochs=1"]):
        code, _, err = run_main(argv)
        assert code == 2 and "unrecognized arguments" in err, err
