"""The figures of a report (matplotlib, Agg), each as PNG and PDF bytes with its caption:
- accuracy: the headline metric after each task per method, ± sample std bands (DynaMMo paper, Fig. 2)
- confusion: the confusion matrix after the last task per method, summed over seeds (Fig. 3)
- efficiency_gflops / efficiency_params: accuracy after task t against inference GFLOPs / parameters
  after task t, one line per method through its task counts (a static model is a vertical line)
- acc_matrix: the accuracy matrix per method, mean over seeds
- forgetting: per task, its best accuracy before the last task minus its accuracy after it
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from dynammo.reporting.aggregate import (Row, Section, build_sections, cost_curve, forgetting_per_task, headline_curve,
                                         mean_acc_matrix, per_task, summed_confusion)
from dynammo.reporting.discover import Run

FIGURE_DPI = 110


@dataclass
class Figure:
    name: str  # file stem: figures/<section slug>/<name>.png / .pdf
    title: str
    caption: str
    png: bytes
    pdf: bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render(fig, name: str, title: str, caption: str) -> Figure:
    plt = _plt()
    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    # a fixed creation date: the same runs give byte-identical PDFs
    fig.savefig(pdf, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return Figure(name, title, caption, png.getvalue(), pdf.getvalue())


def _colours(rows: List[Row]) -> Dict[str, tuple]:
    plt = _plt()
    cmap = plt.cm.tab10 if len(rows) <= 10 else plt.cm.tab20
    return {row.label: cmap(i % cmap.N) for i, row in enumerate(rows)}


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _legend(ax, n: int) -> None:
    """Inside the axes for a few methods, to the right of them for more (it would hide the data)."""
    if n <= 4:
        ax.legend(fontsize=7)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _seeds_text(row: Row) -> str:
    return f"n={len(row.runs)}"


METRIC_NAMES = {"acc": "accuracy", "mcr": "mean class recall", "acc_task_mean": "task-mean accuracy"}


def accuracy_figure(section: Section, title: Optional[str] = None) -> Optional[Figure]:
    plt = _plt()
    rows = section.method_rows
    metric = section.metric if section.metric in METRIC_NAMES else "acc"
    colours = _colours(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    T = 1
    for i, row in enumerate(rows):
        curve = headline_curve(row.runs, metric)
        if curve is None:
            continue
        mean, std = curve
        tasks = np.arange(1, len(mean) + 1)
        T = max(T, len(mean))
        ax.plot(tasks, mean, "o-" if i % 2 == 0 else "s--", ms=4, color=colours[row.label],
                label=f"{row.label} ({_seeds_text(row)})")
        ax.fill_between(tasks, mean - std, mean + std, color=colours[row.label], alpha=0.12, linewidth=0)
    ax.set_xlabel("after task")
    ax.set_ylabel(METRIC_NAMES[metric] + " on all seen classes (%)")
    ax.set_xticks(np.arange(1, T + 1))
    ax.grid(alpha=0.3)
    _legend(ax, len(rows))
    ax.set_title(title or f"{section.title}: {metric} after each task (mean ± sample std)", fontsize=9)
    return _render(fig, "accuracy", f"{METRIC_NAMES[metric].capitalize()} after each task",
                   f"The headline metric ({metric}) on all classes seen so far after each task, mean over seeds; "
                   "the band is ± one sample std (ddof=1; none for one seed).")


def _grid(n: int, panel_w: float, panel_h: float, cols_max: int = 4):
    plt = _plt()
    cols = min(cols_max, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, panel_h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def confusion_figure(section: Section) -> Optional[Figure]:
    rows = section.method_rows
    mats = [(row, *summed_confusion(row.runs)) for row in rows]
    mats = [m for m in mats if m[1] is not None]
    if not mats:
        return None
    n = len(mats[0][1])
    panel = 2.2 + 0.32 * min(n, 30)
    fig, axes = _grid(len(mats), panel, panel + 0.3)
    for ax, (row, conf, names, used) in zip(axes, mats):
        sums = conf.sum(1, keepdims=True)
        norm = np.divide(conf, sums, out=np.zeros_like(conf, dtype=float), where=sums > 0)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        k = len(conf)
        if k <= 12:
            for (t, p), v in np.ndenumerate(conf):
                ax.text(p, t, str(v), ha="center", va="center", fontsize=6,
                        color="white" if norm[t, p] > 0.5 else "black")
        if k <= 20:
            labels = [_short(str(c), 12) for c in names]
            ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=6)
            ax.set_yticks(range(k), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        ax.set_title(f"{_short(row.label, 28)} (sum of {used} seed{'s' if used > 1 else ''})", fontsize=8)
    fig.tight_layout()
    return _render(fig, "confusion", "Confusion after the last task",
                   "Test images of each true class (rows) by predicted class (columns) after the last task, "
                   "summed over every seed of the method (each seed's matrix re-ordered to the dataset's class "
                   "order first); shading: the row's fraction.")


def efficiency_figure(section: Section, cost: str) -> Optional[Figure]:
    """cost: 'inference_gflops' or 'params_total'."""
    plt = _plt()
    rows = section.method_rows
    metric = section.metric if section.metric in METRIC_NAMES else "acc"
    colours = _colours(rows)
    scale, xlabel, name = ((1.0, "inference GFLOPs per image", "efficiency_gflops") if cost == "inference_gflops"
                           else (1e6, "parameters (M)", "efficiency_params"))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs_all = []
    for i, row in enumerate(rows):
        acc, x = headline_curve(row.runs, metric), cost_curve(row.runs, cost, scale)
        if acc is None or x is None:
            continue
        T = min(len(acc[0]), len(x[0]))
        xm, ym = x[0][:T], acc[0][:T]
        xs_all += list(xm)
        c = colours[row.label]
        ax.plot(xm, ym, "-", marker="o", ms=3, color=c, label=row.label)
        ax.plot(xm[-1:], ym[-1:], "o", ms=7, color=c)
        ax.annotate(f"T{T}", (xm[-1], ym[-1]), textcoords="offset points", xytext=(4, 3), fontsize=6, color=c)
    if not xs_all:
        plt.close(fig)
        return None
    pos = [v for v in xs_all if v > 0]
    if pos and max(pos) / min(pos) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"{xlabel} after task t")
    ax.set_ylabel(f"{metric} after task t (%)")
    ax.grid(alpha=0.3)
    _legend(ax, len(rows))
    ax.set_title(f"{section.title}: {metric} against {xlabel}", fontsize=9)
    what = "inference GFLOPs per image" if cost == "inference_gflops" else "parameters"
    return _render(fig, name, f"Accuracy against {what}",
                   f"Each method is a line through its points (its {what} after task t, its {metric} after task t) "
                   "for t = 1..T, means over seeds; the large dot (labelled T) is after the last task. A model that "
                   "does not grow is a vertical line; one that adds a branch per task moves right.")


def acc_matrix_figure(section: Section) -> Optional[Figure]:
    rows = section.method_rows
    if not rows:
        return None
    T = max(min(r.tasks_done for r in row.runs) for row in rows)
    panel = 1.6 + 0.45 * min(T, 20)
    fig, axes = _grid(len(rows), panel, panel)
    im = None
    for ax, row in zip(axes, rows):
        a = mean_acc_matrix(row.runs)
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        n = len(a)
        if n <= 12:
            for (j, i), v in np.ndenumerate(a):
                if not np.isnan(v):
                    ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 60 else "black")
        ticks = range(0, n, max(1, n // 10))
        ax.set_xticks(list(ticks), [str(i + 1) for i in ticks], fontsize=6)
        ax.set_yticks(list(ticks), [str(i + 1) for i in ticks], fontsize=6)
        ax.set_xlabel("evaluated on task", fontsize=7)
        ax.set_ylabel("after task", fontsize=7)
        ax.set_title(f"{_short(row.label, 28)} (n={len(row.runs)})", fontsize=8)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    return _render(fig, "acc_matrix", "Accuracy matrix",
                   "Accuracy (%) on task i's classes (columns) after training task j (rows), mean over seeds.")


def forgetting_figure(section: Section) -> Optional[Figure]:
    plt = _plt()
    rows = section.method_rows
    data = []
    for row in rows:
        curve = per_task(row.runs, lambda r: forgetting_per_task(r.results))
        if curve is not None:
            data.append((row, *curve))
    if not data:
        return None
    colours = _colours(rows)
    T1 = min(len(m) for _, m, _ in data)
    width = 0.8 / len(data)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.2 + 0.5 * T1 * len(data) * 0.35), 4.0))
    for k, (row, mean, std) in enumerate(data):
        x = np.arange(1, T1 + 1) + (k - (len(data) - 1) / 2) * width
        ax.bar(x, mean[:T1], width, yerr=std[:T1] if len(row.runs) > 1 else None, capsize=2,
               color=colours[row.label], label=row.label, error_kw={"elinewidth": 0.7})
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(1, T1 + 1))
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting (points)")
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, len(data))
    ax.set_title(f"{section.title}: forgetting of each task by the end", fontsize=9)
    return _render(fig, "forgetting", "Forgetting per task",
                   "For each task but the last: its best accuracy before the last task minus its accuracy after "
                   "the last task (the terms the forgetting column averages), mean ± sample std over seeds.")


def section_figures(section: Section) -> List[Figure]:
    figs = [accuracy_figure(section), confusion_figure(section), efficiency_figure(section, "inference_gflops"),
            efficiency_figure(section, "params_total"), acc_matrix_figure(section), forgetting_figure(section)]
    return [f for f in figs if f is not None]


def run_figures(run: Run) -> List[Figure]:
    """The figures a run draws into its plots/ folder: those of a report section of this run alone."""
    section = build_sections([run])[0]
    title = f"{run.label} on {run.results.get('dataset')} (seed {run.seed}): {section.metric} after each task"
    figs = [accuracy_figure(section, title), acc_matrix_figure(section), confusion_figure(section)]
    return [f for f in figs if f is not None]
