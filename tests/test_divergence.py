"""A training stage whose loss diverges is named, not published silently: one warning line in the
log, `diverged_stages` in results.json, and a mark on the run's row in every report table
(Markdown, CSV, LaTeX, HTML, report.json).

Real runs: a tiny finetune on digits at lrate 5 without a decaying schedule (its loss grows by
orders of magnitude every epoch, finite), and a replay run at lrate 0.05 beside it in the same
report (no mark)."""
from __future__ import annotations

import csv
import io
import json
import re

import pytest

from dynammo.engine import diverged

RUN = ["dataset=digits", "backbone=resnet20", "img_size=8", "init_cls=5", "increment=5",
       "max_train_per_class=20", "batch_size=16", "epochs=3", "scheduler=none", "progress=false", "plots=false",
       "tensorboard=false", "eval_openset=false"]


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
    root = tmp_path_factory.mktemp("divergence")
    for name, keys in (("diverges", ["method=finetune", "lrate=5"]),
                       ("trains", ["method=replay", "memory_size=20", "lrate=0.05"])):
        proc = cli("run", "--out", str(root / "runs" / name), *RUN, *keys)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli("report", str(root / "runs"), "--out", str(root / "report"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_the_rule_needs_a_loss_that_more_than_doubles_above_the_floor():
    assert diverged(2.6, 10.6)  # DER's classifier stage of issue 22
    assert not diverged(2.6, 5.0)  # less than twice where it started
    assert not diverged(0.01, 0.5)  # more than twice, but below the floor: noise near zero
    assert not diverged(1.0, 0.3)


def test_a_diverged_stage_is_in_the_log_and_results_json(runs):
    res = json.loads((runs / "runs" / "diverges" / "results.json").read_text())
    assert res["status"] == "complete"
    stages = res["diverged_stages"]
    assert [(d["task"], d["stage"]) for d in stages] == [(1, "train"), (2, "train")]
    for d in stages:
        assert d["last_loss"] > 2 * d["first_loss"] and d["last_loss"] > 1
    log = (runs / "runs" / "diverges" / "log.txt").read_text()
    # the epoch lines the warning quotes: its first and last epoch's mean loss
    first = float(re.search(r"task 1/2 train epoch 1/3 loss ([0-9.]+)", log).group(1))
    assert stages[0]["first_loss"] == pytest.approx(first, rel=1e-4)
    warnings = [line for line in log.splitlines() if line.startswith("warning:") and "diverged" in line]
    assert len(warnings) == 2 and warnings[0].startswith("warning: task 1/2 train diverged: mean loss")
    assert "diverged: task 2 train: loss" in log  # the run's summary under its final table
    calm = json.loads((runs / "runs" / "trains" / "results.json").read_text())
    assert calm["diverged_stages"] == []
    assert "diverged" not in (runs / "runs" / "trains" / "log.txt").read_text()


def test_every_report_table_marks_the_diverged_run_and_only_it(runs):
    out = runs / "report"
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| finetune", "| replay"))]
    assert rows and all(("[diverged]" in r) == r.startswith("| finetune") for r in rows)
    assert "finetune diverged in seed" in md  # the note under the tables names task and stage
    table = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    marked = [r for r in table if r["diverged"]]
    assert len(marked) == 1 and "task 1 train: loss" in marked[0]["diverged"]
    assert "diverges" in marked[0]["runs"]
    assert r"[diverged]" in (out / "report.tex").read_text()
    assert "[diverged]" in (out / "report.html").read_text()
    rep = json.loads((out / "report.json").read_text())
    flagged = [r for s in rep["sections"] for r in s["rows"] if r["diverged"]]
    assert len(flagged) == 1 and len(flagged[0]["diverged"]) == 2
