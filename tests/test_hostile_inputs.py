"""Malformed and hostile inputs are one line and exit status 2, never a traceback, a stuck run or a
half-written file (issue 21, part 3). Each class of input has a property (hypothesis) so the next
member of the class is caught too: any YAML document, any JSON value in a results.json field (images,
folders, archives and `dynammo cost`: tests/test_hostile_files.py); the named cases run the real CLI
in subprocesses."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from dynammo.config_yaml import MAX_VALUE_ITEMS, read_yaml
from dynammo.configure import build_config, load_config
from dynammo.errors import UserError
from method_helpers import DIGITS_8PX, cli_args
from test_cli_e2e import assert_user_error

# bounded and reproducible: derandomized, no deadline (the first load of a module is slow), no shrinking
# (a failure is reported as drawn: shrinking a bomb document can take minutes)
BOUNDED = dict(derandomize=True, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.filter_too_much])
# dataset first: the folder/csv tests drop it (TINY[1:])
TINY = cli_args(DIGITS_8PX, epochs=1, max_train_per_class=10, max_test_per_class=5, progress="false", tensorboard="false",
                plots="false", method="finetune", init_cls=5, increment=5)
pytestmark = pytest.mark.usefixtures("single_thread_module")


def png(path: Path, size=(8, 8), seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def folder_cfg(root: Path, **extra):
    return build_config({"dataset": "folder", "data_root": str(root), "img_size": 8, "test_fraction": 0.5,
                         "device": "cpu", **extra})


# ---------------------------------------------------------------- YAML documents


def alias_bomb(levels: int, width: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nseed: *l{levels - 1}\n"


def merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {k0: 1, k1: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)
HOSTILE_YAML = st.one_of(
    st.builds(alias_bomb, st.integers(2, 12), st.integers(2, 12)),
    st.builds(merge_bomb, st.integers(2, 9)),
    st.integers(1, 3000).map(lambda n: "epochs: " + "[" * n + "]" * n + "\n"),
    st.integers(1, 3000).map(lambda n: "a:\n" + "".join(" " * (2 * i + 2) + f"k{i}:\n" for i in range(n))),
    st.sampled_from(["epochs: 0x" + "f" * 4000, "epochs: " + "9" * 5000, "!!python/object/apply:os.system [id]",
                     "a: !!binary AAAA", "? [a, b]\n: c", "epochs: 1e29", "epochs: 100000000000000000000000000000",
                     "\ufeffepochs: 2", "x: *undefined", "- a\n- b", "'unterminated", "{a: 1, a: 2}"]),
)


@settings(**BOUNDED, max_examples=60)
@given(document=st.one_of(
    st.dictionaries(st.text(max_size=12), VALUES, max_size=6).map(lambda d: yaml.safe_dump(d)),
    VALUES.map(lambda v: yaml.safe_dump(v)), HOSTILE_YAML, st.text(max_size=200)),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-8-sig", "latin-1", "utf-32"]))
def test_any_yaml_document_is_a_config_or_one_user_error(tmp_path_factory, document, encoding):
    """read_yaml + build_config on any document, in any encoding: a config, or one UserError line,
    within a bounded time (no alias, merge-key or nesting bomb expands)."""
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    try:
        path.write_bytes(document.encode(encoding))
    except UnicodeEncodeError:
        return
    t0 = time.perf_counter()
    try:
        cfg = build_config(read_yaml(path))
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert len(str(exc)) < 2000, "the message quotes a value without bound"
    else:
        assert isinstance(cfg, dict) and cfg["epochs"] <= 100_000
    assert time.perf_counter() - t0 < 20


def test_the_alias_bomb_of_the_issue_is_refused_quickly_in_one_line(cli, tmp_path):
    """A ~400-byte YAML standing for 9^9 items (a minute and 3.5 GB before): one line, at once, in a
    file and as key=value."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9, 9))
    assert path.stat().st_size < 500
    t0 = time.perf_counter()
    proc = cli("run", "-c", str(path), "--out", str(tmp_path / "never"))
    assert_user_error(proc, f"of config file {path}", f"more than {MAX_VALUE_ITEMS} items", "YAML alias")
    inline = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1]"] + [f"&{c} [{', '.join([f'*{p}'] * 9)}]"
                                                          for p, c in zip("abcde", "bcdef")]) + ", *f]"
    proc = cli("run", f"seed={inline}", "--out", str(tmp_path / "never"))
    assert_user_error(proc, "'seed' of the command line", "YAML alias")
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "never").exists()


def test_utf16_config_is_read_and_other_encodings_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("method: finetune\nepochs: 3\n".encode("utf-16"))  # Windows' editors, PowerShell's >
    cfg = load_config([str(path)])
    assert cfg.method == "finetune" and cfg.epochs == 3
    path.write_bytes("method: finetune\nnote: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text .*save it as UTF-8"):
        read_yaml(path)


def test_integer_keys_have_a_sane_bound(cli, tmp_path):
    proc = cli("run", "--out", str(tmp_path / "never"), *TINY, "epochs=100000000000000000000000000000")
    assert_user_error(proc, "'epochs' must be >= 1 and <= 100000", "100000000000000000000000000000")
    with pytest.raises(UserError, match="'memory_size' must be >= 0 and <= 2147483647"):
        build_config({"memory_size": 2**40})


# ---------------------------------------------------------------- results.json and dynammo report


@pytest.fixture(scope="module")
def finished_run(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "finetune"
    proc = cli("run", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    return out


FIELDS = ["method", "label", "status", "metric", "acc_matrix", "acc", "mcr", "task_il_acc", "avg_acc", "last_acc",
          "avg_mcr", "last_mcr", "forgetting", "bwt", "cost", "budget", "deviations", "extra", "protocol",
          "versions", "tasks", "confusion", "class_order", "class_names", "seed", "ece", "openset", "dataset",
          "backbone", "stopped_because", "diverged_stages", "untuned", "untuned_reason"]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
              st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def mutate(results: dict, data) -> dict:
    """One field, or one item inside a list field, replaced by an arbitrary JSON value."""
    key = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(JSON_VALUES, label="value")
    out = json.loads(json.dumps(results))
    if isinstance(out.get(key), list) and out[key] and data.draw(st.booleans(), label="inside"):
        i = data.draw(st.integers(0, len(out[key]) - 1), label="index")
        if isinstance(out[key][i], list) and out[key][i]:
            out[key][i][data.draw(st.integers(0, len(out[key][i]) - 1))] = value
        elif isinstance(out[key][i], dict) and out[key][i]:
            out[key][i][data.draw(st.sampled_from(sorted(out[key][i])))] = value
        else:
            out[key][i] = value
    else:
        out[key] = value
    return out


@settings(**BOUNDED, max_examples=60)
@given(data=st.data())
def test_any_json_value_in_a_results_field_is_reported_or_skipped_in_one_line(finished_run, tmp_path_factory, data):
    """discover + aggregate + every table format and report.json (figures: the named cases below run
    them): a results.json whose field holds anything JSON can hold is reported, or skipped with one
    'skipped' line and the report stops with one 'error:' line; never an exception."""
    from dynammo.reporting import discover, make_report, per_task_csv, report_json
    from dynammo.reporting.aggregate import (cost_curve, forgetting_per_task, headline_curve, mean_acc_matrix,
                                             summed_confusion)
    from dynammo.reporting.tables import csv_text, latex_text, markdown_section

    results = mutate(json.loads((finished_run / "results.json").read_text()), data)
    run = tmp_path_factory.mktemp("mutant")
    (run / "results.json").write_text(json.dumps(results))
    found = discover([run])
    assert all(p.startswith(("skipped ", "not averaged ")) and "\n" not in p for p in found.problems)
    try:
        report = make_report([run], found)
    except UserError as exc:
        assert not found.runs and "\n" not in str(exc)
        return
    json.dumps(report_json(report), allow_nan=False)
    for s in report.sections:  # the tables, and the numbers every figure is drawn from
        markdown_section(s, 2, [])
        headline_curve(s.runs, s.metric), mean_acc_matrix(s.runs), summed_confusion(s.runs)
        cost_curve(s.runs, "inference_gflops"), [forgetting_per_task(r.results) for r in s.runs]
    csv_text(report.sections), latex_text(report.sections), per_task_csv(report.sections)


@pytest.mark.parametrize("edit,needle", [
    (lambda r: {**r, "acc": [float("nan")] * len(r["acc"]), "last_acc": float("inf")}, "NaN is not JSON"),
    (lambda r: {**r, "last_acc": "high"}, "field 'last_acc'"),
    (lambda r: {**r, "acc_matrix": [["x"] * len(row) for row in r["acc_matrix"]]}, "field 'acc_matrix'"),
    (None, "nested too deeply"),
], ids=["nan-infinity", "string-for-number", "string-in-matrix", "nested-deep"])
def test_report_on_a_malformed_results_json_is_one_line_per_problem(cli, finished_run, tmp_path, edit, needle):
    run = tmp_path / "run"
    run.mkdir()
    if edit is None:
        (run / "results.json").write_text('{"method": "x", "acc_matrix": ' + "[" * 50000 + "]" * 50000 + "}")
    else:
        (run / "results.json").write_text(json.dumps(edit(json.loads((finished_run / "results.json").read_text()))))
    proc = cli("report", str(run), "--out", str(tmp_path / "report"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"skipped {run / 'results.json'}: ") and needle in lines[0]
    assert lines[1].startswith("error: no finished run to report")
    assert not (tmp_path / "report").exists()


def test_resume_on_a_truncated_results_json_is_one_line(cli, finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    text = (run / "results.json").read_text()
    (run / "results.json").write_text(text[: len(text) // 2])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = cli("resume", str(run))
    assert_user_error(proc, "results.json", "is damaged (not valid JSON", "delete it")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
