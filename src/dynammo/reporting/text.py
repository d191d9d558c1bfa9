"""The text of a run's results as the console, log.txt and `dynammo report` show it."""
from __future__ import annotations

from typing import List, Optional


def format_table(results: dict) -> str:
    """Accuracy after each task, as the console and log.txt show it."""
    a = results["acc_matrix"]
    T = len(a)
    head = "after task | " + " ".join(f"T{i + 1:>5}" for i in range(T)) + " |   acc    mcr  tIL-acc"
    lines = [head, "-" * len(head)]
    til = results.get("task_il_acc") or []
    for j, row in enumerate(a):
        cells = " ".join(f"{v:6.1f}" if v is not None else "     -" for v in row)
        t = f"{til[j]:7.1f}" if j < len(til) else "      -"
        lines.append(f"{j + 1:>10} | {cells} | {results['acc'][j]:5.1f} {results['mcr'][j]:6.1f} {t}")
    f = results.get("forgetting")
    lines.append(f"avg acc {results['avg_acc']:.2f}  last acc {results['last_acc']:.2f}  "
                 f"avg mcr {results['avg_mcr']:.2f}  last mcr {results['last_mcr']:.2f}"
                 + (f"  forgetting {f:.2f}  bwt {results['bwt']:.2f}" if f is not None else ""))
    line = task_mean_line(results)
    if line:
        lines.append(line)
    if results.get("avg_ece") is not None and results.get("last_ece") is not None:
        openset = results.get("openset") or {}
        auroc, fpr95 = openset.get("avg_auroc"), openset.get("avg_fpr95")
        of = f" of the {results['classifier']} classifier" if results.get("classifier") not in (None, "head") else ""
        lines.append(f"avg ece {results['avg_ece']:.2f}  last ece {results['last_ece']:.2f}"
                     + (f"  open-set avg auroc {auroc:.2f}  avg fpr95 {fpr95:.2f} ({openset['score']})"
                        if auroc is not None and fpr95 is not None else "") + of)
    for name, extra in (results.get("extra") or {}).items():
        lines.append(f"  {name} classifier: avg acc {extra['avg_acc']:.2f}  last acc {extra['last_acc']:.2f}")
    lines += run_identity_lines(results)
    return "\n".join(lines)


def task_mean_line(results: dict) -> Optional[str]:
    """The mean over tasks of per-task accuracy, where it differs from the pooled acc or is the headline."""
    avg, last = results.get("avg_acc_task_mean"), results.get("last_acc_task_mean")
    if avg is None or last is None:
        return None
    if results.get("metric") != "acc_task_mean" and (round(avg, 2), round(last, 2)) == (
            round(results.get("avg_acc") or 0.0, 2), round(results.get("last_acc") or 0.0, 2)):
        return None
    return (f"avg acc_task_mean {avg:.2f}  last acc_task_mean {last:.2f}  (mean over tasks of each task's accuracy, "
            "as L2P, DualPrompt and CODA-Prompt report; acc pools the images)")


def run_identity_lines(results: dict) -> List[str]:
    """What a table must say beside the numbers: the protocol (and where the run departs from it),
    the method's label and every deviation from its paper."""
    p = results.get("protocol") or {}
    departs = p.get("departs") or {}
    line = f"protocol {p.get('name') or '(none named)'} #{p.get('hash', '?')}, headline {results.get('metric', 'acc')}"
    if departs:
        line += "; departs from it in " + ", ".join(f"{k}={v['run']!r} (protocol: {v['protocol']!r})"
                                                      for k, v in departs.items())
    out = [f"{results.get('label', results['method'])}: {line}"]
    out += [f"deviation: {d}" for d in results.get("deviations") or []]
    if results.get("untuned"):
        out.append(f"untuned: {results.get('untuned_reason')}")
    out += [f"diverged: {diverged_stage_text(d)}" for d in results.get("diverged_stages") or []]
    return out


def diverged_stage_text(d: dict) -> str:
    """'task 2 classifier: loss 2.600 -> 10.600' for an entry of results.json `diverged_stages`."""
    return f"task {d['task']} {d['stage']}: loss {d['first_loss']:.3f} -> {d['last_loss']:.3f}"
