"""`dynammo report`: aggregation over seeds, one section per protocol, best-value marking and the
Markdown/CSV/LaTeX tables (its outputs, errors and the browser: tests/test_report_outputs.py).

The run directories (conftest's `runs`) are real tiny `dynammo run`s (digits at 8 px, seconds each):
two methods with a seed list of two, and one run under another protocol (a different
max_train_per_class)."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from dynammo.reporting import build_sections, discover, make_report, write_report
from dynammo.reporting.aggregate import COLUMNS, mark_best
from dynammo.reporting.tables import cell_text, tex_escape

def results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def copy_run(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a real run directory (results.json and config.yaml), results.json edited by `edit`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    res = results(src)
    if edit:
        res = edit(res) or res
    (dst / "results.json").write_text(json.dumps(res))
    return dst


def section_of(rep: dict, hash_: str) -> dict:
    return next(s for s in rep["sections"] if s["hash"] == hash_)


# ---------------------------------------------------------------- aggregation


def task_means(res: dict) -> list:
    """The mean over the seen tasks of each task's accuracy, by hand from the accuracy matrix."""
    return [statistics.mean(row[: j + 1]) for j, row in enumerate(res["acc_matrix"])]


def test_mean_and_sample_std_equal_hand_computed(runs, report):
    out, _ = report
    rep = json.loads((out / "report.json").read_text())
    seeds = [results(runs / "cmp" / "finetune" / f"seed{s}") for s in (0, 1)]
    sec = section_of(rep, seeds[0]["protocol"]["hash"])
    row = next(r for r in sec["rows"] if r["label"] == "finetune")
    assert row["seeds"] == [0, 1]
    hand = {
        "avg_acc": [r["avg_acc"] for r in seeds], "last_acc": [r["last_acc"] for r in seeds],
        "avg_acc_task_mean": [statistics.mean(task_means(r)) for r in seeds],
        "last_acc_task_mean": [task_means(r)[-1] for r in seeds],
        "avg_mcr": [r["avg_mcr"] for r in seeds], "last_mcr": [r["last_mcr"] for r in seeds],
        "forgetting": [r["forgetting"] for r in seeds], "bwt": [r["bwt"] for r in seeds],
        "last_task_il_acc": [r["task_il_acc"][-1] for r in seeds],
        "inference_gflops": [r["cost"][-1]["inference_gflops"] for r in seeds],
        "params_m": [r["cost"][-1]["params_total"] / 1e6 for r in seeds],
        "memory_exemplars": [r["cost"][-1]["memory_exemplars"] for r in seeds],
        "memory_mb": [r["cost"][-1]["memory_bytes"] / 1e6 for r in seeds],
        "train_seconds": [sum(c["train_seconds"] for c in r["cost"]) for r in seeds],
    }
    assert set(hand) == {c.key for c in COLUMNS}
    for key, vals in hand.items():
        st = row["stats"][key]
        assert st["n"] == 2 and st["values"] == pytest.approx(vals)
        assert st["mean"] == pytest.approx(statistics.mean(vals), abs=1e-12), key
        assert st["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12), key  # sample std, ddof=1
    # the Markdown row shows the same numbers, 2 decimals, with the seed count
    md = (out / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| finetune | 2 |"))
    want = f"{statistics.mean(hand['avg_acc']):.2f} ± {statistics.stdev(hand['avg_acc']):.2f}"
    assert want in line
    # the CSV row too, at full precision
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    crow = next(r for r in rows if r["label"] == "finetune" and r["n_seeds"] == "2")
    assert float(crow["last_acc_mean"]) == pytest.approx(statistics.mean(hand["last_acc"]), abs=1e-12)
    assert float(crow["last_acc_std"]) == pytest.approx(statistics.stdev(hand["last_acc"]), abs=1e-12)
    assert crow["seeds"] == "0;1"


def test_one_seed_shows_no_std(runs, report):
    out, _ = report
    one = results(runs / "other" / "finetune")
    md = (out / "report.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| finetune | 1 |"))
    assert f"| {one['avg_acc']:.2f} |" in line and "±" not in line
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    crow = next(r for r in rows if r["protocol_hash"] == one["protocol"]["hash"])
    assert crow["n_seeds"] == "1" and crow["avg_acc_std"] == ""


def test_two_protocols_are_two_sections_never_averaged(runs, report):
    out, proc = report
    rep = json.loads((out / "report.json").read_text())
    h_cmp = results(runs / "cmp" / "finetune" / "seed0")["protocol"]["hash"]
    h_other = results(runs / "other" / "finetune")["protocol"]["hash"]
    assert h_cmp != h_other
    assert sorted(s["hash"] for s in rep["sections"]) == sorted([h_cmp, h_other])
    # finetune is in both, each with only its own protocol's runs
    assert [r["seeds"] for r in section_of(rep, h_cmp)["rows"] if r["label"] == "finetune"] == [[0, 1]]
    assert [r["seeds"] for r in section_of(rep, h_other)["rows"]] == [[0]]
    md = (out / "report.md").read_text()
    assert md.count(f"## protocol digits #{h_cmp}") == 1 and md.count(f"## protocol digits #{h_other}") == 1
    assert "runs of different protocols are never averaged together" in md
    assert "they differ in: max_train_per_class" in md  # same name, other values: says which
    assert "never averaged together" in proc.stdout
    tex = (out / "report.tex").read_text()
    assert tex.count(r"\begin{table}") == 4  # accuracy and cost table per protocol


def test_task_mean_accuracy_columns_only_where_it_is_the_headline(runs, tmp_path):
    """A protocol whose headline metric is acc_task_mean (the prompt protocols, as their papers) shows
    the task-mean columns, from the accuracy matrix, beside the pooled acc; other protocols do not."""
    from dynammo.reporting.tables import markdown_section

    a = [[80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 100.0]]  # tasks of unequal size below

    def edit(res):
        res.update(metric="acc_task_mean", acc_matrix=a, acc=[80.0, 70.0, 62.0], avg_acc=70.67, last_acc=62.0)

    papers = copy_run(runs / "other" / "finetune", tmp_path / "papers", edit)
    [section] = build_sections(discover([papers]).runs)
    [row] = section.rows
    assert row.stats["last_acc_task_mean"].mean == pytest.approx((50 + 70 + 100) / 3)
    assert row.stats["avg_acc_task_mean"].mean == pytest.approx((80 + 75 + 220 / 3) / 3)
    md = markdown_section(section)
    head = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert "avg task-mean acc" in head and "last task-mean acc" in head and "last acc" in head
    assert "73.33" in next(line for line in md.splitlines() if line.startswith("| finetune |"))
    assert "mean over the seen tasks of each task's accuracy" in md
    [plain] = build_sections(discover([runs / "other" / "finetune"]).runs)
    assert "task-mean" not in markdown_section(plain)


# ---------------------------------------------------------------- best value, formats


def _displayed(row, col):
    return float(format(row.stats[col.key].mean, col.fmt))


def test_best_value_per_column(runs, report):
    out, _ = report
    found = discover([runs / "cmp"])
    [section] = build_sections(found.runs)
    assert [r.name for r in section.rows] == ["finetune", "replay"]
    marked_any = False
    for col in COLUMNS:
        shown = {r.name: _displayed(r, col) for r in section.rows if r.stats.get(col.key)}
        marked = {r.name for r in section.rows if col.key in r.best}
        if len(set(shown.values())) < 2:  # equal for every row (same network: GFLOPs, params): unmarked
            assert not marked, col.key
            continue
        best = (max if col.better == "higher" else min)(shown.values())
        assert marked == {n for n, v in shown.items() if v == best}, col.key
        marked_any = True
    assert marked_any
    assert "inference_gflops" not in section.rows[0].best + section.rows[1].best  # finetune = replay's net
    # replay keeps exemplars, finetune none: fewer exemplars is better
    assert "memory_exemplars" in section.rows[0].best
    # the marks in each format
    md = (out / "report.md").read_text()
    tex = (out / "report.tex").read_text()
    rows = {(r["protocol_hash"], r["label"]): r for r in csv.DictReader(io.StringIO((out / "report.csv").read_text()))}
    for row in section.rows:
        crow = rows[(section.hash, row.label)]
        assert crow["best"].split(";") == (row.best or [""])
        for key in row.best:
            col = next(c for c in COLUMNS if c.key == key)
            if col.metric not in (None, section.metric):  # a column of another headline: in the CSV only
                continue
            text = cell_text(row.stats[key], col)
            assert f"**{text}**" in md
            assert rf"\textbf{{{tex_escape(text)}}}" in tex


def test_mark_best_higher_bwt_lower_forgetting_and_ties(runs):
    """On copies of one real row: BWT higher is better, forgetting lower; equal shown values tie."""
    import copy

    found = discover([runs / "cmp" / "finetune"])
    [section] = build_sections(found.runs)
    a = section.rows[0]
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    from dynammo.reporting.aggregate import Stat

    a.stats["bwt"], b.stats["bwt"], c.stats["bwt"] = Stat(-5.0, None, 1, (-5.0,)), Stat(-1.0, None, 1, (-1.0,)), \
        Stat(-1.001, None, 1, (-1.001,))
    a.stats["forgetting"], b.stats["forgetting"], c.stats["forgetting"] = (Stat(v, None, 1, (v,)) for v in (3.0, 9.0, 3.004))
    mark_best([a, b, c])
    assert "bwt" in b.best and "bwt" in c.best and "bwt" not in a.best  # -1.00 shown for both b and c
    assert "forgetting" in a.best and "forgetting" in c.best and "forgetting" not in b.best


def test_latex_escaping(runs, tmp_path):
    specials = r"a_b & 50% #1 {x} ~y^2 $z\w <>|"
    esc = tex_escape(specials)
    assert esc == (r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}y\textasciicircum{}2 \$z\textbackslash{}w "
                   r"\textless{}\textgreater{}\textbar{}")
    assert tex_escape("1.00 ± 0.20") == r"1.00 $\pm$ 0.20"
    # a label and a deviation with specials, in a copied real run
    src = runs / "cmp" / "finetune" / "seed0"

    def edit(res):
        res["label"] = "fine_tune [lr=0.1 & 5%]"
        res["deviations"] = ["uses $\\alpha$_2 # of {epochs}"]

    copy_run(src, tmp_path / "runs" / "ft", edit)
    out = tmp_path / "rep"
    write_report(make_report([tmp_path / "runs"]), out, ["tex", "md"])
    tex = (out / "report.tex").read_text()
    assert r"fine\_tune [lr=0.1 \& 5\%]$^{1}$" in tex
    assert r"uses \$\textbackslash{}alpha\$\_2 \# of \{epochs\}" in tex
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    # every line with cells has the same number of unescaped & as the header
    for block in tex.split(r"\begin{tabular}")[1:]:
        body = block.split(r"\end{tabular}")[0]
        lines = [l for l in body.splitlines() if l.endswith(r"\\")]
        counts = {len(re.findall(r"(?<!\\)&", l)) for l in lines}
        assert len(counts) == 1, lines


def test_markdown_is_pasteable(report):
    out, _ = report
    md = (out / "report.md").read_text()
    assert md.startswith("# dynammo report\n")
    assert "headline metric: accuracy on all seen classes (acc)" in md
    for table in re.findall(r"((?:^\|.*\|\n)+)", md, flags=re.M):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
