"""report.html: one self-contained page (inline CSS, figures as base64 PNG data URIs, no external
resource) with the tables, the figures, each run's config and versions, and links to the run folders."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Dict, List

from dynammo.reporting.aggregate import Section
from dynammo.reporting.figures import Figure
from dynammo.reporting.tables import COST_COLUMNS, acc_columns, describe, html_table, unfinished_lines

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1250px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th { border-bottom: 2px solid #888; background: #f6f6f6; }
th:first-child, th.text, td.method, td.text { text-align: left; white-space: normal; }
td.best { background: #e8f3e8; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
.problems { background: #fff6e0; border: 1px solid #e6c766; padding: 0.5em 1em; font-size: 0.85em; }
.note { font-size: 0.9em; color: #444; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
code { font-size: 0.9em; }
"""

# marks each image as loaded (naturalWidth > 0) or broken once the page has loaded: a headless
# browser's DOM dump shows it (tests/test_report_cmd.py)
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', good ? 'yes' : 'broken');
    imgs[i].setAttribute('data-natural-width', String(imgs[i].naturalWidth));
    if (good) ok++;
  }
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def _rel(path: Path, out_dir: Path) -> str:
    """The link from report.html (in out_dir) to a run folder."""
    try:
        rel = os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
    except ValueError:  # another drive (Windows)
        rel = str(Path(path).resolve())
    return Path(rel).as_posix() + "/"


def _run_details(run, out_dir: Path) -> str:
    e = html.escape
    res = run.results
    versions = res.get("versions") or {}
    vtxt = ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"
    link = _rel(run.dir, out_dir)
    parts = [f"<details><summary>{e(run.label)} seed {e(str(run.seed))}: <code>{e(str(run.dir))}</code> "
             f"({e(run.status)})</summary>",
             f'<p><a href="{e(link)}">{e(link)}</a> (run directory, relative to this page)</p>',
             f"<p>versions: {e(vtxt)}</p>"]
    if run.config_text is not None:
        parts.append(f"<p>config.yaml:</p><pre>{e(run.config_text)}</pre>")
    else:
        parts.append("<p>config.yaml: not found in the run directory</p>")
    parts.append("</details>")
    return "\n".join(parts)


def _figure(fig: Figure, section: Section) -> str:
    e = html.escape
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{e(section.slug)}-{e(fig.name)}"><img alt="{e(fig.title)}" '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption><b>{e(fig.title)}.</b> {e(fig.caption)} "
            f"(files: figures/{e(section.slug)}/{e(fig.name)}.png, .pdf)</figcaption></figure>")


def html_page(sections: List[Section], figures: Dict[str, List[Figure]], problems: List[str], notes: List[str],
              out_dir: Path, header: str) -> str:
    e = html.escape
    body = ["<h1>dynammo report</h1>", f'<p class="note">{e(header)}</p>']
    for n in notes:
        body.append(f'<p class="note"><b>{e(n)}</b></p>')
    if problems:
        body.append('<div class="problems"><p>Not in the tables:</p><ul>'
                    + "".join(f"<li>{e(p)}</li>" for p in problems) + "</ul></div>")
    if len(sections) > 1:
        body.append("<p>Sections: " + ", ".join(f'<a href="#{e(s.slug)}">{e(s.title)}</a>' for s in sections) + "</p>")
    for s in sections:
        body.append(f'<h2 id="{e(s.slug)}">{e(s.title)}</h2>')
        body += [f"<p>{e(line)}</p>" for line in describe(s)]
        body += ["<h3>Accuracy (%)</h3>", html_table(s, acc_columns(s), "deviations")]
        if s.notes:
            body.append("<p>Deviations from the papers:</p><ol>" + "".join(f"<li>{e(d)}</li>" for d in s.notes) + "</ol>")
        body += ["<h3>Cost after the last task</h3>", html_table(s, COST_COLUMNS, "budget")]
        for w in s.warnings:
            body.append(f'<p class="note">Note: {e(w)}</p>')
        if s.unfinished:
            body.append("<p>Not averaged (unfinished):</p><ul>" + "".join(f"<li>{e(t)}</li>" for t in unfinished_lines(s))
                        + "</ul>")
        body.append("<h3>Figures</h3>")
        body += [_figure(f, s) for f in figures.get(s.slug, [])]
        body.append("<h3>Runs</h3>")
        body += [_run_details(r, out_dir) for r in s.runs + s.unfinished]
    title = "dynammo report: " + ", ".join(s.title for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
