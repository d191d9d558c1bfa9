"""An experiment: the config's seed list, one run per seed, and summary.json over the seeds."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from dynammo.config import Config
from dynammo.console import Console
from dynammo.distributed import current_world
from dynammo.errors import UserError
from dynammo.io import write_json_atomic
from dynammo.metrics import OPENSET_KEYS, SUMMARY_KEYS, mean_std
from dynammo.run import seeds_of
from dynammo.run.build import join_world
from dynammo.run.single import run_single
from dynammo.rundir import default_run_dir


def run_experiment(cfg: Config, out: Optional[Path], console: Console, notices: Sequence[str] = ()) -> List[dict]:
    """Run every seed; with several seeds each gets out/seed<N>/ and out/summary.json is written. The
    config's notices are printed once the first run can start (rank 0 of a distributed run)."""
    cfg, console = join_world(cfg, console)
    world = current_world()
    out = Path(world.broadcast(str(out) if out is not None else str(default_run_dir(cfg))))  # one name for all ranks
    seeds = seeds_of(cfg)
    if len(seeds) > 1 and (out / "summary.json").exists():
        raise UserError(f"run directory {out} already holds a run; choose another --out or remove it")
    results = []
    for seed in seeds:
        run_cfg = cfg.copy()
        run_cfg["seed"] = seed
        results.append(run_single(run_cfg, out if len(seeds) == 1 else out / f"seed{seed}", console,
                                  notices if not results else ()))
    if len(seeds) > 1:
        summary = summarize(results)
        if world.main:
            write_json_atomic(out / "summary.json", summary)
        m = summary["metric"]
        console.print(f"over {len(seeds)} seeds (mean ± sample std): avg {m} {summary[f'avg_{m}']['mean']:.2f} ± "
                      f"{summary[f'avg_{m}']['std']:.2f}, last {m} {summary[f'last_{m}']['mean']:.2f} ± "
                      f"{summary[f'last_{m}']['std']:.2f}")
    return results


def summary_stat(values: List[float]) -> dict:
    """summary.json's record of one metric over the seeds: mean, sample std (None for one seed), values."""
    stat = mean_std(values)
    return {"mean": stat.mean, "std": stat.std, "values": values}


def summarize(results: List[dict]) -> dict:
    """summary.json of a seed list: mean ± sample std of every headline metric, for the headline
    classifier and for every extra one (iCaRL's CNN head beside its NME)."""
    first = results[0]
    out = {"method": first["method"], "label": first.get("label", first["method"]), "dataset": first["dataset"],
           "protocol": first.get("protocol"), "metric": first.get("metric", "acc"), "classifier": first.get("classifier"),
           "deviations": first.get("deviations", []), "seeds": [r["seed"] for r in results], "std": "sample (ddof=1)"}

    def block(runs: List[dict]) -> dict:
        return {key: summary_stat([r[key] for r in runs]) for key in SUMMARY_KEYS
                if all(r.get(key) is not None for r in runs)}

    out.update(block(results))
    opensets = [r.get("openset") for r in results]
    if all(opensets) and len({o["score"] for o in opensets}) == 1:
        out["openset"] = {"score": opensets[0]["score"], "positive": opensets[0].get("positive", "known")}
        out["openset"].update({f"avg_{k}": summary_stat([o[f"avg_{k}"] for o in opensets]) for k in OPENSET_KEYS
                               if all(o.get(f"avg_{k}") is not None for o in opensets)})
    extras = sorted(set.intersection(*(set(r.get("extra") or {}) for r in results)))
    if extras:
        out["extra"] = {name: block([r["extra"][name] for r in results]) for name in extras}
    return out
