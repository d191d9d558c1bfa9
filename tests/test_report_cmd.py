"""`dynammo report`: discovery, aggregation over seeds, one section per protocol, best-value marking,
the Markdown/CSV/LaTeX/HTML outputs, the error lines, atomic output, and report.html in a real
headless browser (Chromium from the system packages; skipped when it is absent).

The run directories are real tiny `dynammo run`s (digits at 8 px, seconds each): two methods with a
seed list of two, and one run under another protocol (a different max_train_per_class). Error cases
use copies of their results.json, cut (half-written), emptied of the run's keys (foreign) or put
back to the state of a run still running."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from dynammo.reporting import build_sections, discover, make_report, write_report
from dynammo.reporting.aggregate import COLUMNS, mark_best
from dynammo.reporting.tables import cell_text, tex_escape
from method_helpers import tiny_run_args

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(run_in_process, tmp_path_factory):
    """root/cmp/{finetune,replay}: seed lists [0, 1]; root/other/finetune: seed 0 with max_train_per_class=10."""
    root = tmp_path_factory.mktemp("report_runs")
    for out, name, kw in [(root / "cmp" / "finetune", "finetune", {"seed": "[0,1]"}),
                          (root / "cmp" / "replay", "replay", {"seed": "[0,1]"}),
                          (root / "other" / "finetune", "finetune", {"max_train_per_class": 10})]:
        assert run_in_process("run", "--out", out, *tiny_run_args(name, **kw)) == 0
    return root


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


@pytest.fixture(scope="module")
def report(cli, runs, tmp_path_factory):
    """The full report of both folders, as `dynammo report` writes it."""
    out = tmp_path_factory.mktemp("reports") / "report"
    proc = cli("report", str(runs / "cmp"), str(runs / "other"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


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


# ---------------------------------------------------------------- outputs


def test_output_files_and_figures(report):
    from PIL import Image

    out, proc = report
    for name in ("report.md", "report.csv", "per_task.csv", "report.tex", "report.html", "report.json"):
        assert (out / name).is_file(), name
    figs = sorted((out / "figures").rglob("*.png"))
    names = {p.stem for p in figs}
    assert names == {"accuracy", "confusion", "efficiency_gflops", "efficiency_params", "acc_matrix", "forgetting"}
    assert len(figs) == 12  # 6 per protocol
    for png in figs:
        assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert "report of 5 runs under 2 protocol(s)" in proc.stdout


def test_confusion_is_summed_over_seeds_in_dataset_order(runs):
    import numpy as np

    from dynammo.reporting.aggregate import summed_confusion

    found = discover([runs / "cmp" / "replay"])
    conf, names, used = summed_confusion(found.runs)
    assert used == 2
    want = np.zeros_like(conf)
    for run in found.runs:
        order = run.results["class_order"]
        c = np.array(run.results["confusion"])
        for t in range(len(order)):
            for p in range(len(order)):
                want[order[t], order[p]] += c[t, p]
        for i, o in enumerate(order):
            assert names[o] == run.results["class_names"][i]
    assert np.array_equal(conf, want)
    assert conf.sum() == sum(np.array(r.results["confusion"]).sum() for r in found.runs)


def test_formats_option_through_the_cli(cli, runs, tmp_path):
    out = tmp_path / "r"
    proc = cli("report", str(runs / "cmp"), "--out", str(out), "--format", "md,csv")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["figures", "per_task.csv", "report.csv", "report.json", "report.md"]
    assert stderr_lines(proc) == []
    # run again: the earlier report is replaced as a whole
    proc = cli("report", str(runs / "cmp" / "replay"), "--out", str(out), "--format", "html")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.json"]
    bad = cli("report", str(runs / "cmp"), "--out", str(tmp_path / "x"), "--format", "md,pdf")
    assert bad.returncode == 2 and stderr_lines(bad) == [
        "error: --format 'md,pdf': choose one or more of md,csv,tex,html (comma-separated)"]
    assert not (tmp_path / "x").exists()


def test_html_is_self_contained(runs, report):
    from PIL import Image

    out, _ = report
    page = (out / "report.html").read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", page)  # no CDN, no web font
    assert "@import" not in page and "url(" not in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 12
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.size[0] > 100
    # each run: its config and versions in <details>, a relative link to its folder
    n_details = page.count("<details>")
    assert n_details == 5
    seed0 = results(runs / "cmp" / "finetune" / "seed0")
    assert html.escape(f"torch {seed0['versions']['torch']}") in page
    cfg = (runs / "cmp" / "finetune" / "seed0" / "config.yaml").read_text()
    assert html.escape(cfg) in page
    links = re.findall(r'<a href="([^"#]+)"', page)
    assert len(links) == 5
    for link in links:
        assert not os.path.isabs(link)
        assert (out / link / "results.json").is_file(), link


# ---------------------------------------------------------------- errors


def test_directory_without_runs_is_one_line_and_exit_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 2
    assert stderr_lines(proc) == [f"skipped {tmp_path / 'empty'}: holds no run (no results.json in it or below it)",
                                  f"error: no finished run to report under {tmp_path / 'empty'}; 1 problem(s) listed above"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "rep").exists() and list(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_broken_foreign_and_running_runs_are_listed_not_averaged(cli, runs, tmp_path):
    src = runs / "cmp" / "replay" / "seed0"
    copy_run(src, tmp_path / "runs" / "ok")
    half = copy_run(src, tmp_path / "runs" / "half")
    text = (half / "results.json").read_text()
    (half / "results.json").write_text(text[: len(text) // 2])  # a writer killed mid-file
    copy_run(src, tmp_path / "runs" / "foreign", lambda r: {"accuracy": r["acc"], "model": "x"})

    def running(res):  # what results.json holds after task 2 of 3
        res.update(status="running", acc_matrix=res["acc_matrix"][:2], acc=res["acc"][:2], cost=res["cost"][:2],
                   seed=7)
        res.pop("confusion")

    copy_run(src, tmp_path / "runs" / "running", running)
    out = tmp_path / "rep"
    proc = cli("report", str(tmp_path / "runs"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = stderr_lines(proc)
    r = tmp_path / "runs"
    assert lines[0] == f"skipped {r / 'foreign' / 'results.json'}: not a dynammo results.json (no method or acc_matrix)"
    assert lines[1].startswith(f"skipped {r / 'half' / 'results.json'}: not valid JSON (half-written?) at line ")
    assert lines[2] == f"not averaged {r / 'running'}: replay seed 7 is running, 2/3 tasks done"
    assert len(lines) == 3
    rep = json.loads((out / "report.json").read_text())
    [sec] = rep["sections"]
    assert [row["seeds"] for row in sec["rows"]] == [[0]]  # the running run (seed 7) is not averaged
    assert sec["unfinished"] == [{"dir": str(r / "running"), "label": "replay", "seed": 7,
                                  "state": "running, 2/3 tasks done"}]
    md = (out / "report.md").read_text()
    assert f"- {r / 'running'}: replay seed 7, running, 2/3 tasks done" in md
    assert "not valid JSON" in md and "not a dynammo results.json" in md


def test_nothing_usable_exit_2_and_no_output(cli, runs, tmp_path):
    src = runs / "cmp" / "replay" / "seed0"
    copy_run(src, tmp_path / "runs" / "a", lambda r: r.update(status="interrupted", stopped_because="SIGTERM after task 2/3",
                                                               acc_matrix=r["acc_matrix"][:2]))
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "results.json").write_text('{"method": "replay", "acc_matr')
    proc = cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) == 3 and "Traceback" not in proc.stderr
    assert lines[0] == (f"not averaged {tmp_path / 'runs' / 'a'}: replay seed 0 is interrupted, 2/3 tasks done "
                        "(stopped because: SIGTERM after task 2/3)")
    assert lines[1].startswith(f"skipped {tmp_path / 'runs' / 'b' / 'results.json'}: not valid JSON")
    assert lines[2] == f"error: no finished run to report under {tmp_path / 'runs'}; 2 problem(s) listed above"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_out_holding_something_else_is_refused(cli, runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = cli("report", str(runs / "cmp" / "replay"), "--out", str(out))
    assert proc.returncode == 2
    assert stderr_lines(proc) == [f"error: --out {out} exists and holds something other than a dynammo report; "
                                  "choose another --out or empty it"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failure_leaves_no_half_written_report(runs, tmp_path, monkeypatch):
    """A report that fails while being written (here: in the LaTeX table) leaves the previous report as
    it was and no temporary folder."""
    import dynammo.reporting as reporting

    out = tmp_path / "rep"
    rep = make_report([runs / "cmp" / "replay"])
    write_report(rep, out, ["md"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(sections):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(reporting, "latex_text", boom)
    with pytest.raises(RuntimeError):
        write_report(make_report([runs / "cmp"]), out, ["md", "csv", "tex", "html"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_paths_given_twice_or_nested_count_once(runs):
    found = discover([runs / "cmp", runs / "cmp" / "replay", runs / "cmp" / "replay" / "seed0" / "results.json"])
    assert len(found.runs) == 4 and not found.problems


# ---------------------------------------------------------------- compare_methods.py uses the library


def test_compare_methods_prints_the_report_section(cli, runs):
    """The benchmark script's table is dynammo.reporting's: on runs already made it only reads them."""
    proc = cli.python(ROOT / "benchmarks" / "compare_methods.py", "--protocol", "digits", "--methods", "finetune",
                      "replay", "--seeds", "0", "1", "--out", runs / "cmp", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "$ " not in proc.stdout  # nothing was run again
    from dynammo.reporting import markdown_section

    [section] = build_sections(discover([runs / "cmp"]).runs)
    assert markdown_section(section, level=3) in proc.stdout


# ---------------------------------------------------------------- a real browser


def chromium(*args, timeout=120):
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--no-first-run", "--disable-dev-shm-usage", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium; "
                                             ".ci/run installs it)")
def test_report_html_in_headless_chromium(runs, report, tmp_path):
    import numpy as np
    from PIL import Image

    out, _ = report
    url = (out / "report.html").resolve().as_uri()
    dom = chromium("--dump-dom", "--virtual-time-budget=10000", url).stdout
    # the page's own script marked every image once the page had loaded
    assert 'data-images-loaded="12/12"' in dom, dom[:2000]
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 12
    for tag in imgs:
        assert 'data-loaded="yes"' in tag
        assert int(re.search(r'data-natural-width="(\d+)"', tag).group(1)) > 100
    # the tables are in the rendered DOM: method names and their numbers
    seeds = [results(runs / "cmp" / "replay" / f"seed{s}") for s in (0, 1)]
    vals = [r["avg_acc"] for r in seeds]
    text = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert re.search(r'<td class="method">replay</td><td>2</td>(<td[^>]*>(<strong>)?[^<]*(</strong>)?</td>)*?'
                     rf'<td[^>]*data-col="avg_acc">(<strong>)?{re.escape(text)}', dom), text
    assert '<td class="method">finetune</td><td>1</td>' in dom  # the other protocol's single run

    # a screenshot: not blank
    shot = tmp_path / "page.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,3000", url)
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=float)
    assert a.shape == (3000, 1200)
    assert a.std() > 20 and (a < 200).mean() > 0.02  # text, tables and figures, not an empty page

    # the check sees a broken image: one figure's data cut in a copy of the page
    page = (out / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]{100}', 'src="data:image/png;base64,AAAA', page, count=1))
    dom = chromium("--dump-dom", "--virtual-time-budget=10000", broken.as_uri()).stdout
    assert 'data-images-loaded="11/12"' in dom and dom.count('data-loaded="broken"') == 1
