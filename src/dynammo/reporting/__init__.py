"""`dynammo report RUN_DIR... [--out DIR] [--format md,csv,tex,html]`: run directories in, the
tables, figures and one HTML page a paper or a decision needs out.

- discover: every folder holding a results.json under the given paths (single runs, seed lists);
  half-written or foreign files and unfinished runs are reported one line each, never averaged
- aggregate: one section per protocol (name and hash; different protocols are never averaged
  together), one row per method label, mean ± sample std (ddof=1) over seeds
- tables: Markdown, CSV, LaTeX (booktabs), HTML; figures: PNG and PDF; html: report.html

The output folder is built in a temporary folder beside it and renamed into place, so a failed
report leaves no half-written files (a previous report there is replaced only when the new one is
complete).
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from dynammo.errors import UserError
from dynammo.reporting.aggregate import (Row, Section, Stat, budget_text, build_sections, cost_curve,
                                         headline_curve, mean_std, protocol_differences)
from dynammo.reporting.discover import Discovery, Run, discover, read_run
from dynammo.reporting.tables import csv_text, latex_text, markdown_section

FORMATS = ("md", "csv", "tex", "html")
_UMASK = os.umask(0)
os.umask(_UMASK)
REPORT_KIND = "dynammo-report"

__all__ = ["FORMATS", "Report", "Row", "Run", "Section", "Stat", "budget_text", "build_sections", "discover",
           "make_report", "markdown_section", "mean_std", "parse_formats", "read_run", "write_report"]


def parse_formats(text: str) -> List[str]:
    """'md,csv' -> ['md', 'csv'] (each once, in the order given)."""
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise UserError(f"--format {text!r}: choose one or more of {','.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(items))


@dataclass
class Report:
    inputs: List[str]
    discovery: Discovery
    sections: List[Section]
    notes: List[str] = field(default_factory=list)  # what the report says of the protocols as a whole

    @property
    def problems(self) -> List[str]:
        """Every line stderr showed."""
        return self.discovery.problems

    @property
    def left_out(self) -> List[str]:
        """What the report lists above its sections: the runs skipped, and unfinished runs of a protocol
        no finished run has (the others are listed in their protocol's section)."""
        in_sections = {id(u) for s in self.sections for u in s.unfinished}
        return self.discovery.skipped + [f"not averaged {u.dir}: {u.label} seed {u.seed} is {u.state_text()}"
                                         for u in self.discovery.unfinished if id(u) not in in_sections]


def make_report(paths: Sequence, found: Optional[Discovery] = None) -> Report:
    """Discover (unless `found` is given) and aggregate. UserError (one line) when no run is usable."""
    found = discover(paths) if found is None else found
    if not found.runs:
        why = f"; {len(found.problems)} problem(s) listed above" if found.problems else ""
        raise UserError(f"no finished run to report under {', '.join(map(str, paths))}{why}")
    sections = build_sections(found.runs, found.unfinished)
    in_sections = {id(u) for s in sections for u in s.unfinished}
    orphans = [u for u in found.unfinished if id(u) not in in_sections]
    notes = []
    if len(sections) > 1:
        notes.append(f"{len(sections)} protocols: runs of different protocols are never averaged together; "
                     "each protocol has its own section.")
    notes += protocol_differences(sections)
    if orphans:
        notes.append(f"{len(orphans)} unfinished run(s) of protocols no finished run has; listed above, not in any section.")
    return Report([str(p) for p in paths], found, sections, notes)


# ---------------------------------------------------------------- files


def _stat_json(st: Optional[Stat]):
    return None if st is None else {"mean": st.mean, "std": st.std, "n": st.n, "values": list(st.values)}


def report_json(report: Report) -> dict:
    from dynammo import __version__

    return {
        "kind": REPORT_KIND, "dynammo": __version__, "inputs": report.inputs, "problems": report.problems,
        "notes": report.notes, "std": "sample (ddof=1)",
        "sections": [{
            "protocol": s.name, "hash": s.hash, "metric": s.metric, "departs": s.departs, "notes": s.notes,
            "warnings": s.warnings, "unfinished": [{"dir": str(u.dir), "label": u.label, "seed": u.seed,
                                                    "state": u.state_text()} for u in s.unfinished],
            "rows": [{"label": r.label, "method": r.method, "classifier": r.classifier, "seeds": r.seeds,
                      "runs": [str(x.dir) for x in r.runs], "best": r.best, "budget": r.budget,
                      "deviations": r.deviations, "diverged": r.diverged,
                      "stats": {k: _stat_json(v) for k, v in r.stats.items()}}
                     for r in s.rows],
        } for s in report.sections],
    }


def per_task_csv(sections: List[Section]) -> str:
    """One row per method per protocol per task: the accuracy, MCR and cost curves the figures draw."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "protocol_hash", "label", "n_seeds", "task", "acc_mean", "acc_std", "mcr_mean", "mcr_std",
                "inference_gflops_mean", "params_m_mean"])
    for s in sections:
        for row in s.method_rows:
            acc, mcr = headline_curve(row.runs, "acc"), headline_curve(row.runs, "mcr")
            gf, pm = cost_curve(row.runs, "inference_gflops"), cost_curve(row.runs, "params_total", 1e6)
            T = len(acc[0]) if acc else 0
            for t in range(T):
                def cell(curve, k):
                    return "" if curve is None or t >= len(curve[k]) else repr(float(curve[k][t]))
                w.writerow([s.name or "", s.hash, row.label, len(row.runs), t + 1, cell(acc, 0),
                            cell(acc, 1) if len(row.runs) > 1 else "", cell(mcr, 0),
                            cell(mcr, 1) if len(row.runs) > 1 else "", cell(gf, 0), cell(pm, 0)])
    return buf.getvalue()


def _is_report_dir(path: Path) -> bool:
    import json

    try:
        return json.loads((path / "report.json").read_text()).get("kind") == REPORT_KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path) -> None:
    """The report may replace an earlier report or fill an empty folder, nothing else."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder for the report")
        if any(out.iterdir()) and not _is_report_dir(out):
            raise UserError(f"--out {out} exists and holds something other than a dynammo report; "
                            "choose another --out or empty it")


def write_report(report: Report, out, formats: Sequence[str] = FORMATS,
                 progress: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Write the chosen formats, the figures (PNG and PDF) and report.json into `out`, atomically.
    Returns the files written (paths inside `out`)."""
    from dynammo.reporting.figures import section_figures
    from dynammo.reporting.html import html_page

    out = Path(out)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes a 0700 folder; give the user's usual permissions
    written: List[str] = []

    def put(rel: str, data) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        written.append(rel)

    try:
        figures: Dict[str, list] = {}
        for s in report.sections:
            if progress:
                progress(f"figures of {s.title}")
            figures[s.slug] = section_figures(s)
            for fig in figures[s.slug]:
                put(f"figures/{s.slug}/{fig.name}.png", fig.png)
                put(f"figures/{s.slug}/{fig.name}.pdf", fig.pdf)
        if "md" in formats:
            parts = ["# dynammo report", ""]
            parts += [n + "\n" for n in report.notes]
            if report.left_out:
                parts += ["Not in the tables:", ""] + [f"- {p}" for p in report.left_out] + [""]
            for s in report.sections:
                figs = [(f.title, f"figures/{s.slug}/{f.name}.png") for f in figures[s.slug]]
                parts.append(markdown_section(s, 2, figs))
            put("report.md", "\n".join(parts).rstrip() + "\n")
        if "csv" in formats:
            put("report.csv", csv_text(report.sections))
            put("per_task.csv", per_task_csv(report.sections))
        if "tex" in formats:
            put("report.tex", latex_text(report.sections))
        if "html" in formats:
            from dynammo import __version__

            n_methods = len({(s.hash, r.label) for s in report.sections for r in s.method_rows})
            header = (f"{sum(len(s.runs) for s in report.sections)} finished runs of {n_methods} methods under "
                      f"{len(report.sections)} protocol(s), from {', '.join(report.inputs)}; dynammo {__version__}, "
                      f"{time.strftime('%Y-%m-%d %H:%M')}.")
            put("report.html", html_page(report.sections, figures, report.left_out, report.notes, out, header))
        import json

        put("report.json", json.dumps(report_json(report), indent=2, allow_nan=False) + "\n")
        _install(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the report into {out}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / rel for rel in written]


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder into place; an earlier report there is removed after."""
    check_out_dir(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if old is not None:
            os.rename(old, out)
        raise UserError(f"could not move the report into {out}: {exc.strerror or exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
