"""The tables of a report, from the same rows in Markdown, CSV, LaTeX (booktabs) and HTML: mean ±
sample std over seeds, the number of seeds, the best value per column marked, deviations as notes."""
from __future__ import annotations

import csv
import html
import io
from typing import List, Optional

from dynammo.reporting.aggregate import COLUMNS, Column, Row, Section, Stat

ACC_COLUMNS = [c for c in COLUMNS if c.table == "acc"]
COST_COLUMNS = [c for c in COLUMNS if c.table == "cost"]

METRIC_TEXT = {"acc": "accuracy on all seen classes (acc)", "mcr": "mean class recall (mcr)",
               "acc_task_mean": "mean over the seen tasks of each task's accuracy (task-mean acc, the papers' "
                                "average accuracy; acc pools the images)"}


def acc_columns(section: Section) -> List[Column]:
    """The accuracy table's columns: a column of one headline metric only where it is the headline."""
    return [c for c in ACC_COLUMNS if c.metric is None or c.metric == section.metric]


def cell_text(stat: Optional[Stat], col: Column, pm: str = "±") -> str:
    """'95.58 ± 1.23'; one seed (or a cost every seed measured alike): the mean alone; '-' when absent."""
    if stat is None:
        return "-"
    text = format(stat.mean, col.fmt)
    if stat.std is not None and (col.std_if_equal or len(set(stat.values)) > 1):
        text += f" {pm} {format(stat.std, col.fmt)}"
    return text


def describe(section: Section) -> List[str]:
    """The sentences every format states above a section's tables."""
    metric = section.metric
    lines = []
    if section.recorded:
        line = f"Protocol {section.name or '(unnamed)'} (hash {section.hash}); headline metric: {METRIC_TEXT.get(metric, metric)}."
    else:
        line = ("These runs' results.json hold no protocol record (written before protocols existed): nothing "
                "says their data, split and budget match; headline metric: " + METRIC_TEXT.get(metric, metric) + ".")
    lines.append(line)
    if section.departs:
        lines.append("The runs depart from the shipped protocol in: " + ", ".join(
            f"{k}={v.get('run')!r} (protocol: {v.get('protocol')!r})" for k, v in section.departs.items()) + ".")
    seeds = sorted({str(s) for r in section.runs for s in [r.seed]})
    lines.append(f"{len(section.runs)} runs of {len(section.method_rows)} methods, seeds {', '.join(seeds)}; "
                 "mean ± sample std (ddof=1) over seeds, n = number of seeds (no std for one seed). "
                 "Costs are after the last task, training time summed over tasks; a cost every seed measured "
                 "alike shows no std.")
    lines.append("Best value per column marked (higher is better for accuracies, MCR and BWT; lower for "
                 "forgetting and costs; not marked where every row shows the same value).")
    return lines


def _refs(section: Section, row: Row) -> str:
    return ", ".join(map(str, section.note_refs(row)))


# ---------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(section: Section, columns: List[Column], extra: str = "") -> str:
    """extra: 'budget' adds the budget column, 'notes' the deviation references."""
    head = ["method", "n"] + [c.title for c in columns] + ([extra] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1 - bool(extra))
                                                           + (["---"] if extra else [])) + "|"]
    for row in section.rows:
        cells = [_md_escape(row.name), str(len(row.runs))]
        for c in columns:
            text = cell_text(row.stats.get(c.key), c)
            cells.append(f"**{text}**" if c.key in row.best else text)
        if extra == "budget":
            cells.append(_md_escape(row.budget))
        elif extra == "deviations":
            cells.append(_refs(section, row) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unfinished_lines(section: Section) -> List[str]:
    return [f"{u.dir}: {u.label} seed {u.seed}, {u.state_text()}" for u in section.unfinished]


def markdown_section(section: Section, level: int = 2, figures: Optional[List[tuple]] = None) -> str:
    """One protocol as Markdown: a heading, what the numbers are, the accuracy and cost tables, the
    deviation notes, the runs not averaged, and (figures: [(caption, relative path)]) the figures."""
    h = "#" * level
    out = [f"{h} {section.title}", "", " ".join(describe(section)), "",
           f"{h}# Accuracy (%)", "", markdown_table(section, acc_columns(section), "deviations"), ""]
    if section.notes:
        out += ["Deviations from the papers:", ""] + [f"{i}. {_md_escape(d)}" for i, d in enumerate(section.notes, 1)] + [""]
    out += [f"{h}# Cost after the last task", "", markdown_table(section, COST_COLUMNS, "budget"), ""]
    for w in section.warnings:
        out += [f"Note: {_md_escape(w)}", ""]
    if section.unfinished:
        out += ["Not averaged (unfinished):", ""] + [f"- {_md_escape(t)}" for t in unfinished_lines(section)] + [""]
    if figures:
        out += [f"{h}# Figures", ""] + [f"![{_md_escape(cap)}]({path})" for cap, path in figures] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- CSV


def csv_text(sections: List[Section]) -> str:
    """One row per method (and extra classifier) per protocol: every column's mean and std, the seeds,
    `best` (the columns where the row is best, ';'-separated), deviations and run directories."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["protocol", "protocol_hash", "metric", "method", "label", "classifier", "n_seeds", "seeds"]
    for c in COLUMNS:
        head += [f"{c.key}_mean", f"{c.key}_std"]
    w.writerow(head + ["best", "budget", "deviations", "untuned", "runs", "diverged"])
    for s in sections:
        for row in s.rows:
            cells = [s.name or "", s.hash, s.metric, row.method, row.label, row.classifier or "", len(row.runs),
                     ";".join(map(str, row.seeds))]
            for c in COLUMNS:
                st = row.stats.get(c.key)
                cells += ["" if st is None else repr(st.mean), "" if st is None or st.std is None else repr(st.std)]
            cells += [";".join(row.best), row.budget, " | ".join(row.deviations), int(row.untuned), ";".join(str(r.dir) for r in row.runs),
                      " | ".join(row.diverged)]
            w.writerow(cells)
    return buf.getvalue()


# ---------------------------------------------------------------- LaTeX


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
        "±": r"$\pm$", "…": r"\ldots{}", "|": r"\textbar{}", "\n": " "}


def tex_escape(text) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _tex_table(section: Section, columns: List[Column], caption: str, label: str, extra: str) -> List[str]:
    spec = "l" + "r" * (len(columns) + 1) + ("l" if extra == "budget" else "")
    head = ["Method", "$n$"] + [c.tex for c in columns] + (["Budget"] if extra == "budget" else [])
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for row in section.rows:
        name = tex_escape(row.name)
        refs = _refs(section, row) if extra == "deviations" else ""
        if refs:
            name += f"$^{{{refs}}}$"
        cells = [name, str(len(row.runs))]
        for c in columns:
            text = tex_escape(cell_text(row.stats.get(c.key), c))
            cells.append(rf"\textbf{{{text}}}" if c.key in row.best else text)
        if extra == "budget":
            cells.append(tex_escape(row.budget))
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if extra == "deviations" and section.notes:
        out.append(r"\par\smallskip\footnotesize\raggedright")
        out += [rf"$^{{{i}}}$ {tex_escape(d)}\par" for i, d in enumerate(section.notes, 1)]
    out += [r"\end{table}", ""]
    return out


def latex_text(sections: List[Section]) -> str:
    """Tables to \\input{} into a paper (needs \\usepackage{booktabs}); best values in bold."""
    out = ["% dynammo report: tables for \\input{}; needs \\usepackage{booktabs}", ""]
    for s in sections:
        about = tex_escape(" ".join(describe(s)))
        title = tex_escape(s.title)
        out += [f"% {title}", ""]
        out += _tex_table(s, acc_columns(s), f"Accuracy (\\%), {title}. {about}", f"tab:acc-{s.slug}", "deviations")
        out += _tex_table(s, COST_COLUMNS, f"Cost after the last task, {title}.", f"tab:cost-{s.slug}", "budget")
    return "\n".join(out)


# ---------------------------------------------------------------- HTML


def html_table(section: Section, columns: List[Column], extra: str) -> str:
    e = html.escape
    head = ["method", "n"] + [c.title for c in columns]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head)
           + (f'<th class="text">{e(extra)}</th>' if extra else "") + "</tr></thead>", "<tbody>"]
    for row in section.rows:
        refs = _refs(section, row)
        name = e(row.name) + (f"<sup>{e(refs)}</sup>" if refs and extra == "deviations" else "")
        cells = [f'<td class="method">{name}</td>', f"<td>{len(row.runs)}</td>"]
        for c in columns:
            text = e(cell_text(row.stats.get(c.key), c))
            best = c.key in row.best
            cells.append(f'<td class="best" data-col="{c.key}"><strong>{text}</strong></td>' if best
                         else f'<td data-col="{c.key}">{text}</td>')
        if extra == "budget":
            cells.append(f'<td class="text">{e(row.budget)}</td>')
        elif extra == "deviations":
            cells.append(f'<td class="text">{e(refs or "-")}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)
