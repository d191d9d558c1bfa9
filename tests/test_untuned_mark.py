"""A method run under a shipped protocol for which it has no method file trains with the framework's
generic optimiser: results.json, the log and every report table say so (issue 22)."""
from __future__ import annotations

import csv
import io
import json

import pytest

from dynammo.configure import load_config
from dynammo.protocols import untuned_reason
from dynammo.reporting import make_report, write_report

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["epochs=1", "max_train_per_class=8", "max_test_per_class=8", "progress=false", "plots=false",
         "tensorboard=false", "save_checkpoints=false", "eval_openset=false"]


def test_untuned_is_computed_from_the_method_files():
    reason = untuned_reason(load_config(["cifar100_acl", "der"]))
    assert reason is not None and "configs/methods/der/cifar100_acl.yaml" in reason and "generic optimiser" in reason
    assert untuned_reason(load_config(["cifar100_acl", "dynammo"])) is None  # it ships that file
    assert untuned_reason(load_config(["digits", "replay"])) is None
    assert untuned_reason(load_config(None, ["method=der", "dataset=digits"])) is None  # no protocol named


def test_untuned_run_is_marked_in_results_log_and_report_tables(run_in_process, tmp_path):
    untuned, tuned = tmp_path / "runs" / "untuned", tmp_path / "runs" / "tuned"
    assert run_in_process("run", "-c", "digits_vit", "-c", "replay", "--out", str(untuned), *SMALL) == 0
    assert run_in_process("run", "-c", "digits", "-c", "replay", "--out", str(tuned), *SMALL) == 0
    res = json.loads((untuned / "results.json").read_text())
    assert res["untuned"] is True and "configs/methods/replay/digits_vit.yaml" in res["untuned_reason"]
    assert json.loads((tuned / "results.json").read_text())["untuned"] is False
    assert "untuned: no method file configs/methods/replay/digits_vit.yaml" in (untuned / "log.txt").read_text()
    assert "untuned:" not in (tuned / "log.txt").read_text()

    out = tmp_path / "report"
    write_report(make_report([tmp_path / "runs"]), out, formats=("md", "csv", "tex", "html"))
    md = (out / "report.md").read_text()
    assert "replay [untuned]" in md and md.count("[untuned]") >= 1
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    by_protocol = {r["protocol"]: r["untuned"] for r in rows if r["classifier"] == ""}
    assert by_protocol == {"digits_vit": "1", "digits": "0"}
    assert "[untuned]" in (out / "report.tex").read_text() and "[untuned]" in (out / "report.html").read_text()
