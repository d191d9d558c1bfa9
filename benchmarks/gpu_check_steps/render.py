"""The GPU check's record as Markdown: a summary table of the steps, then each step's rows."""
from __future__ import annotations

from typing import List


def markdown(record: dict) -> str:
    env = record["environment"]
    what = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"# GPU check ({record['mode']})", "",
             f"Device: {what} ({env.get('device')}); torch {env.get('torch')}, CUDA {env.get('cuda')}; "
             f"auto compute path: {env.get('auto_compute', env.get('error'))}; commit {env.get('commit')}.",
             f"Budget {record['budget_s']:g} s, elapsed {record.get('elapsed_s', 0):g} s. "
             f"Steps: {record.get('summary')}.", "",
             "| step | status | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {st['name']} | {st['status']} | {st['seconds']} | {cell(st['reason'])} |" for st in record["steps"]]
    for st in record["steps"]:
        lines += ["", f"## {st['name']}: {st['title']}", ""]
        render = RENDER.get(st["name"], render_generic)
        lines += render(st["rows"]) if st["rows"] else [f"{st['status']}: {st['reason']}"]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_methods(rows: List[dict]) -> List[str]:
    out = ["| method | protocol | status | last acc auto | last acc fp32 | max / mean gap (points) | auto path | "
           "seconds auto / fp32 | peak GPU MiB | reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, f = r.get("auto") or {}, r.get("fp32") or {}
        gap = f"{r['gap_max']} / {r['gap_mean']}" if "gap_max" in r else ""
        out.append(f"| {r['name']} | {cell(r.get('protocol'))} | {r['status']} | {cell(a.get('last_acc'))} | "
                   f"{cell(f.get('last_acc'))} | {gap} | {cell(a.get('compute'))} | {cell(a.get('seconds'))} / "
                   f"{cell(f.get('seconds'))} | {cell(a.get('peak_gpu_mib'))} | {cell(r.get('reason'))} |")
    return out


def render_speed(rows: List[dict]) -> List[str]:
    out = ["| backbone @ size | batch | images x epochs | dynammo img/s | bare img/s | dynammo / bare | compute | status |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {cell(r.get('batch_size'))} | {cell(r.get('images'))} x {cell(r.get('epochs'))} | "
                   f"{cell(r.get('framework_img_s'))} | {cell(r.get('bare_img_s'))} | {cell(r.get('ratio'))} | "
                   f"{cell(r.get('compute'))} | {r['status']} {cell(r.get('reason'))} |")
    return out


def render_latency(rows: List[dict]) -> List[str]:
    out = ["| T | ACL GFLOPs | DynaMMo GFLOPs | ACL ms (batch 1) | DynaMMo ms (batch 1) | ACL ms/image (batch) | "
           "DynaMMo ms/image (batch) | status |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = {n: next((v for k, v in r.items() if k.startswith(f"{n}_ms_per_image")), "") for n in ("acl", "dynammo")}
        out.append(f"| {r.get('tasks', r['name'])} | {cell(r.get('acl_gflops'))} | {cell(r.get('dynammo_gflops'))} | "
                   f"{cell(r.get('acl_ms_batch1'))} | {cell(r.get('dynammo_ms_batch1'))} | {cell(per['acl'])} | {cell(per['dynammo'])} | "
                   f"{r['status']} {cell(r.get('reason'))} |")
    return out


def render_generic(rows: List[dict]) -> List[str]:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return out


RENDER = {"methods": render_methods, "speed": render_speed, "latency": render_latency}
