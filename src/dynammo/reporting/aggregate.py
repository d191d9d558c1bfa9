"""Grouping runs by protocol and method label, and the statistics over seeds (mean and sample std,
ddof=1, as papers report; no std for one seed)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dynammo.metrics import Stat, mean_defined, mean_std, task_mean_accuracy
from dynammo.reporting.text import diverged_stage_text
from dynammo.reporting.discover import Run


@dataclass(frozen=True)
class Column:
    key: str
    title: str  # Markdown / HTML / CSV header
    tex: str  # LaTeX header (already LaTeX)
    better: Optional[str]  # "higher", "lower", or None (not marked)
    fmt: str
    table: str  # "acc" or "cost"
    std_if_equal: bool = True  # cost columns: no "± 0.000" when every seed measured the same
    metric: Optional[str] = None  # shown only in the sections whose headline metric this is


def _last(seq):
    return seq[-1] if seq else None


def _acc_getter(key: str) -> Callable[[dict, dict], Optional[float]]:
    return lambda res, run: res.get(key)


def task_means(res: dict) -> List[Optional[float]]:
    """acc_task_mean after each task, from the accuracy matrix (also for runs written before it was recorded)."""
    return task_mean_accuracy(res.get("acc_matrix") or [])


def _cost_getter(key: str, scale: float = 1.0) -> Callable[[dict, dict], Optional[float]]:
    def get(res, run):
        last = _last(run.get("cost") or [])
        return None if last is None or last.get(key) is None else last[key] / scale
    return get


def _train_seconds(res, run):
    cost = run.get("cost") or []
    vals = [c.get("train_seconds") for c in cost]
    return None if not cost or any(v is None for v in vals) else float(sum(vals))


COLUMNS: List[Column] = [
    Column("avg_acc", "avg acc", "avg acc", "higher", ".2f", "acc"),
    Column("last_acc", "last acc", "last acc", "higher", ".2f", "acc"),
    Column("avg_acc_task_mean", "avg task-mean acc", "avg task-mean acc", "higher", ".2f", "acc",
           metric="acc_task_mean"),
    Column("last_acc_task_mean", "last task-mean acc", "last task-mean acc", "higher", ".2f", "acc",
           metric="acc_task_mean"),
    Column("avg_mcr", "avg MCR", "avg MCR", "higher", ".2f", "acc"),
    Column("last_mcr", "last MCR", "last MCR", "higher", ".2f", "acc"),
    Column("forgetting", "forgetting", "forgetting", "lower", ".2f", "acc"),
    Column("bwt", "BWT", "BWT", "higher", ".2f", "acc"),
    Column("last_task_il_acc", "last task-IL acc", "last task-IL acc", "higher", ".2f", "acc"),
    Column("inference_gflops", "GFLOPs/image", "GFLOPs/image", "lower", ".4g", "cost", False),
    Column("params_m", "params (M)", "params (M)", "lower", ".3g", "cost", False),
    Column("memory_exemplars", "exemplars", "exemplars", "lower", ".0f", "cost", False),
    Column("memory_mb", "memory (MB)", "memory (MB)", "lower", ".3g", "cost", False),
    Column("train_seconds", "train time (s)", "train time (s)", "lower", ".1f", "cost"),
]
COLUMN = {c.key: c for c in COLUMNS}

# how each column is read from (the classifier's metrics, the run's results.json)
GETTERS: Dict[str, Callable[[dict, dict], Optional[float]]] = {
    "avg_acc": _acc_getter("avg_acc"), "last_acc": _acc_getter("last_acc"),
    "avg_acc_task_mean": lambda res, run: mean_defined(task_means(res)),
    "last_acc_task_mean": lambda res, run: _last(task_means(res)),
    "avg_mcr": _acc_getter("avg_mcr"), "last_mcr": _acc_getter("last_mcr"),
    "forgetting": _acc_getter("forgetting"), "bwt": _acc_getter("bwt"),
    "last_task_il_acc": lambda res, run: _last(res.get("task_il_acc") or []),
    "inference_gflops": _cost_getter("inference_gflops"), "params_m": _cost_getter("params_total", 1e6),
    "memory_exemplars": _cost_getter("memory_exemplars"), "memory_mb": _cost_getter("memory_bytes", 1e6),
    "train_seconds": _train_seconds,
}


def budget_text(results: dict) -> str:
    """The training budget of a run: epochs per stage of the first and of later tasks, images seen."""
    def stages(task):
        return " + ".join(f"{s['stage']} {s['epochs']}" for s in task)

    budget = results.get("budget") or []
    parts = [stages(budget[0])] if budget else []
    later = {stages(t) for t in budget[1:]}
    if later and later != set(parts):
        parts.append("later: " + " / ".join(sorted(later)))
    images = sum(c.get("train_images", 0) or 0 for c in results.get("cost") or [])
    return f"{'; '.join(parts)} ep ({images / 1000:.1f}k images)" if parts else f"({images / 1000:.1f}k images)"


@dataclass
class Row:
    """One method label (or one extra classifier of it) under one protocol, over its seeds."""

    label: str
    method: str
    runs: List[Run]
    classifier: Optional[str] = None  # the extra classifier's name; None for the headline one
    stats: Dict[str, Optional[Stat]] = field(default_factory=dict)
    deviations: List[str] = field(default_factory=list)
    budget: str = ""
    best: List[str] = field(default_factory=list)  # keys of the columns where this row is best
    untuned: bool = False  # a run trained with the generic optimiser: no method file for this protocol
    diverged: List[str] = field(default_factory=list)  # "seed S: task T stage: loss a -> b", one per diverged stage

    @property
    def name(self) -> str:
        name = self.label if self.classifier is None else f"{self.label}, {self.classifier} classifier (extra)"
        return name + (" [diverged]" if self.diverged else "") + (" [untuned]" if self.untuned else "")

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def metrics_of(self, run: Run) -> dict:
        return run.results if self.classifier is None else run.results["extra"][self.classifier]


@dataclass
class Section:
    """Every run of one protocol (name and hash): one table, one set of figures."""

    name: Optional[str]
    hash: str
    runs: List[Run]
    unfinished: List[Run] = field(default_factory=list)
    rows: List[Row] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # deviations, numbered 1.. in order of appearance
    warnings: List[str] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        return not self.hash.startswith("unrecorded:")

    @property
    def title(self) -> str:
        if not self.recorded:
            return f"runs without a protocol record ({self.hash.split(':', 1)[1]})"
        return f"protocol {self.name or '(unnamed)'} #{self.hash}"

    @property
    def slug(self) -> str:
        base = f"{self.name or 'unnamed'}-{self.hash}" if self.recorded else self.hash.replace(":", "-")
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)

    @property
    def first(self) -> dict:
        return self.runs[0].results

    @property
    def metric(self) -> str:
        return self.first.get("metric", "acc")

    @property
    def protocol(self) -> dict:
        return self.first.get("protocol") or {}

    @property
    def departs(self) -> dict:
        return self.protocol.get("departs") or {}

    @property
    def method_rows(self) -> List[Row]:
        """The headline classifier's rows (figures show these)."""
        return [r for r in self.rows if r.classifier is None]

    def note_refs(self, row: Row) -> List[int]:
        return [self.notes.index(d) + 1 for d in row.deviations]


def _row(label: str, runs: List[Run], classifier: Optional[str]) -> Row:
    row = Row(label, runs[0].method, runs, classifier)
    for col in COLUMNS:
        row.stats[col.key] = mean_std([GETTERS[col.key](row.metrics_of(r), r.results) for r in runs])
    row.deviations = list(dict.fromkeys(d for r in runs for d in (r.results.get("deviations") or [])))
    row.untuned = any(r.results.get("untuned") for r in runs)
    row.diverged = [f"seed {r.seed}: {diverged_stage_text(d)}"
                    for r in runs for d in r.results.get("diverged_stages") or []]
    budgets = list(dict.fromkeys(budget_text(r.results) for r in runs))
    row.budget = budgets[0] if len(budgets) == 1 else " | ".join(f"seed {r.seed}: {budget_text(r.results)}" for r in runs)
    return row


def _display(value: float, fmt: str) -> float:
    """A value as its table shows it: the best is chosen among displayed values, so that two rows
    printed alike are both marked."""
    return float(format(value, fmt))


def mark_best(rows: List[Row]) -> None:
    """Every row's `best`: the columns where its mean is the best (higher or lower as the column says).
    Nothing is marked in a column with fewer than two values or where every row shows the same value."""
    for row in rows:
        row.best = []
    for col in COLUMNS:
        if col.better is None:
            continue
        shown = [(row, _display(row.stats[col.key].mean, col.fmt)) for row in rows if row.stats.get(col.key)]
        values = {v for _, v in shown}
        if len(shown) < 2 or len(values) < 2:
            continue
        best = max(values) if col.better == "higher" else min(values)
        for row, v in shown:
            if v == best:
                row.best.append(col.key)


def build_sections(runs: List[Run], unfinished: Sequence[Run] = ()) -> List[Section]:
    """One section per protocol (name, hash), its rows sorted by label; a label's extra classifiers
    (present in every seed) follow it. Runs of different protocols are never averaged together."""
    by_key: Dict[Tuple, List[Run]] = {}
    for run in runs:
        by_key.setdefault(run.protocol_key, []).append(run)
    sections = []
    for (name, phash), group in sorted(by_key.items(), key=lambda kv: (kv[0][0] or "~", kv[0][1])):
        section = Section(name, phash, group)
        section.unfinished = [u for u in unfinished if u.protocol_key == (name, phash)]
        by_label: Dict[str, List[Run]] = {}
        for run in group:
            by_label.setdefault(run.label, []).append(run)
        for label in sorted(by_label):
            lruns = sorted(by_label[label], key=lambda r: (str(r.seed), str(r.dir)))
            seeds = [r.seed for r in lruns]
            dupes = sorted({str(s) for s in seeds if seeds.count(s) > 1})
            if dupes:
                section.warnings.append(f"{label}: seed(s) {', '.join(dupes)} appear in more than one run "
                                        f"({', '.join(str(r.dir) for r in lruns if str(r.seed) in dupes)}); each counts")
            lengths = {r.tasks_done for r in lruns}
            if len(lengths) > 1:
                section.warnings.append(f"{label}: the runs finished different numbers of tasks {sorted(lengths)}")
            section.rows.append(_row(label, lruns, None))
            if section.rows[-1].untuned:
                reason = next(r.results.get("untuned_reason") for r in lruns if r.results.get("untuned"))
                section.warnings.append(f"{label} is untuned: {reason}")
            for text in section.rows[-1].diverged:
                section.warnings.append(f"{label} diverged in {text}: its numbers are those of a run whose training "
                                        "loss ended far above where it started")
            extras = set.intersection(*(set(r.results.get("extra") or {}) for r in lruns))
            for extra in sorted(extras):
                section.rows.append(_row(label, lruns, extra))
        for row in section.rows:
            for d in row.deviations:
                if d not in section.notes:
                    section.notes.append(d)
        mark_best(section.rows)
        sections.append(section)
    return sections


def protocol_differences(sections: List[Section]) -> List[str]:
    """For protocols recorded under the same name with different hashes: the keys whose values differ."""
    out = []
    named: Dict[str, List[Section]] = {}
    for s in sections:
        if s.recorded and s.name:
            named.setdefault(s.name, []).append(s)
    for name, group in named.items():
        if len(group) < 2:
            continue
        values = [s.protocol.get("values") or {} for s in group]
        keys = sorted({k for v in values for k in v if len({repr(x.get(k)) for x in values}) > 1})
        out.append(f"protocol {name} was run with {len(group)} different value sets "
                   f"({', '.join('#' + s.hash for s in group)}); they differ in: {', '.join(keys) or 'unknown keys'}")
    return out


# ---------------------------------------------------------------- per-task curves (figures, per_task.csv)


def per_task(runs: List[Run], get: Callable[[Run], Optional[Sequence[Optional[float]]]]):
    """(mean, std) arrays over seeds of a per-task series (truncated to the shortest run); std is 0
    for one seed. None when a run lacks the series."""
    series = [get(r) for r in runs]
    if not series or any(s is None or len(s) == 0 for s in series):
        return None
    T = min(len(s) for s in series)
    a = np.array([[np.nan if v is None else float(v) for v in s[:T]] for s in series], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(a, 0)
        std = np.nanstd(a, 0, ddof=1) if len(a) > 1 else np.zeros(T)
    return mean, np.nan_to_num(std)


def headline_curve(runs: List[Run], metric: str):
    if metric == "acc_task_mean":
        return per_task(runs, lambda r: task_means(r.results))
    return per_task(runs, lambda r: r.results.get(metric if metric in ("acc", "mcr") else "acc"))


def cost_curve(runs: List[Run], key: str, scale: float = 1.0):
    return per_task(runs, lambda r: [None if c.get(key) is None else c[key] / scale for c in r.results.get("cost") or []])


def mean_acc_matrix(runs: List[Run]) -> np.ndarray:
    """The accuracy matrix averaged over seeds (NaN above the diagonal)."""
    T = min(r.tasks_done for r in runs)
    mats = np.array([[[np.nan if v is None else float(v) for v in row[:T]] for row in r.results["acc_matrix"][:T]]
                     for r in runs], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN above the diagonal: a mean of nothing
        return np.nanmean(mats, 0) if mats.size else np.zeros((0, 0))


def forgetting_per_task(results: dict) -> Optional[List[float]]:
    """For each task i but the last: its best accuracy before the last task minus its accuracy after
    the last task (the terms that `forgetting` (Chaudhry et al. 2018) averages)."""
    a = results["acc_matrix"]
    T = len(a)
    if T < 2:
        return None
    terms = []  # None where a task's accuracy is undefined (no test images): the figure leaves a gap
    for i in range(T - 1):
        before = [a[j][i] for j in range(i, T - 1) if a[j][i] is not None]
        terms.append(max(before) - a[T - 1][i] if before and a[T - 1][i] is not None else None)
    return terms


def summed_confusion(runs: List[Run]) -> Tuple[Optional[np.ndarray], List[str], int]:
    """The confusion after the last task summed over seeds, rows and columns in the dataset's class
    order (each run's matrix is in its own incremental label order, which the seed may shuffle).
    Returns (matrix, class names, number of runs summed)."""
    total, names, used = None, [], 0
    for r in runs:
        res = r.results
        conf, order, cnames = res.get("confusion"), res.get("class_order"), res.get("class_names")
        if conf is None or order is None or cnames is None:
            continue
        conf = np.asarray(conf, dtype=np.int64)
        n = len(order)
        if conf.shape != (n, n) or len(cnames) != n:
            continue
        # label i of this run is class order[i] of the dataset
        by_dataset = np.zeros_like(conf)
        by_dataset[np.ix_(order, order)] = conf
        run_names = [None] * n
        for i, c in enumerate(order):
            run_names[c] = cnames[i]
        if total is None:
            total, names = by_dataset, run_names
        elif by_dataset.shape != total.shape or run_names != names:
            continue
        else:
            total = total + by_dataset
        used += 1
    return total, names, used


def finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
