"""`dynammo report`'s outputs (files, figures, the self-contained HTML page, and report.html in a
real headless browser: Chromium from the system packages, skipped when it is absent), its one-line
errors, atomic output, and benchmarks/compare_methods.py printing its section.

The real runs and the report: conftest's `runs` and `report`. Error cases use copies of their
results.json, cut (half-written), emptied of the run's keys (foreign) or put back to the state of a
run still running."""
from __future__ import annotations

import base64
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
from test_report_cmd import copy_run, results

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


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
