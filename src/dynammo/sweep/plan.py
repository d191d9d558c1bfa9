"""The grid of `dynammo sweep`: one PlannedRun per (method, seed), every config validated before
anything runs, and what a planned run's folder already holds (its state, the config it was made with)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

from dynammo.config import ALIASES, IGNORED_REFERENCE_KEYS, OPTIONS
from dynammo.config_yaml import parse_overrides, read_yaml
from dynammo.configure import all_method_options, load_config
from dynammo.errors import UserError
from dynammo.protocols import (DEFAULT_PROTOCOL, PROTOCOL_KEYS, RESULT_NEUTRAL_KEYS, protocol_names,
                               shipped_method_file)
from dynammo.registry import closest
from dynammo.run import seeds_of


@dataclass
class PlannedRun:
    index: int  # 0-based position in the grid (the SLURM array index)
    method: str  # canonical name: the folder DIR/<method>/
    seed: int
    dir: Path
    overrides: List[str]  # the key=value arguments this method is given
    config: dict  # the resolved config the run gets: compared with an earlier run in its folder

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


@dataclass
class Plan:
    sources: List[str]  # the -c arguments before the method's
    out: Path
    runs: List[PlannedRun]
    protocol: Optional[str]
    notices: List[str] = field(default_factory=list)  # config notes and where each override goes

    def fresh_args(self, run: PlannedRun) -> List[str]:
        """`dynammo run` arguments of one run, composed as benchmarks/compare_methods.py always did."""
        args = ["run"]
        for source in self.sources:
            args += ["-c", source]
        return args + ["-c", run.method, "--out", str(run.dir), f"seed={run.seed}", "progress=false",
                       *run.overrides]


def canonical_methods(names: Sequence[str]) -> List[str]:
    """Canonical names, each once, in the order given; one line for an unknown one."""
    from dynammo.methods import METHODS

    if not names:
        raise UserError("--methods: give at least one method, e.g. --methods finetune replay (see `dynammo list`)")
    return list(dict.fromkeys(METHODS.canonical(n) for n in names))


def check_sources(sources: Sequence[str]) -> None:
    """Each -c is a shipped protocol or a YAML file; methods come from --methods."""
    from dynammo.methods import METHODS

    for source in sources:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            read_yaml(path)  # one line when it is missing or not YAML
        elif source in METHODS:
            raise UserError(f"-c {source} is a method; give the methods with --methods (and the protocol with -c)")
        elif source not in protocol_names():
            raise UserError(f"-c {source}: no such protocol or YAML file{closest(source, protocol_names())}; "
                            f"protocols: {', '.join(protocol_names())}")


def check_method_files(protocol: Optional[str], methods: Sequence[str]) -> None:
    """No method file may set what the protocol fixes: the comparison would not be fair."""
    for method in methods:
        path = shipped_method_file(method, protocol)
        if path is None:
            continue
        clash = sorted(set(read_yaml(path)) & set(PROTOCOL_KEYS))
        if clash:
            raise UserError(f"{path} sets protocol key(s) {', '.join(clash)}; a method file may not change "
                            f"protocol {protocol}")


def route_overrides(overrides: Sequence[str], methods: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """Each key=value with the methods it is given to: a general key to every method, a method's key
    only to the swept methods that declare it (a key none of them knows is an error)."""
    from dynammo.methods import METHODS

    declared = {m: METHODS.get(m).options for m in methods}
    routes = []
    for item in overrides:
        parse_overrides([item])  # one line for a malformed override
        key = override_key(item)
        if key == "method":
            raise UserError(f"{item}: give the methods with --methods, not method=")
        if key == "seed":
            raise UserError(f"{item}: give the seeds with --seeds S1 S2 ..., not seed=")
        if key in OPTIONS or key in IGNORED_REFERENCE_KEYS:
            routes.append((item, list(methods)))
            continue
        takers = [m for m in methods if key in declared[m]]
        if not takers:
            owners = all_method_options().get(key)
            hint = (f" (a key of {', '.join(owners)}, not swept)" if owners else
                    closest(key, [*OPTIONS, *(k for opts in declared.values() for k in opts)]))
            raise UserError(f"{item}: '{key}' is neither a general config key nor a key of the swept methods "
                            f"({', '.join(methods)}){hint}; see `dynammo list --keys`")
        routes.append((item, takers))
    return routes


def parse_seeds(tokens: Sequence[str]) -> List[int]:
    seeds = []
    for token in tokens:
        try:
            seed = int(token)
        except ValueError:
            seed = -1
        if seed < 0 or seed > 2**32 - 1:
            raise UserError(f"--seeds: {token!r} is not a seed (a whole number from 0 to 2**32 - 1)")
        seeds.append(seed)
    return list(dict.fromkeys(seeds))


def method_config(sources: List[str], method: str, overrides: List[str]):
    """The validated config of one method (bad input stops here, before anything runs)."""
    try:
        return load_config([*sources, method], [*overrides, "progress=false"])
    except UserError as exc:
        raise UserError(f"method {method}: {exc}") from None


def check_out(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep's run directories")
    return out


def plan_sweep(sources: Sequence[str], methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str],
               out) -> Plan:
    """The grid: one PlannedRun per (method, seed), every config validated. Writes nothing."""
    sources = list(sources) or [DEFAULT_PROTOCOL]
    check_sources(sources)
    methods = canonical_methods(methods)
    out = check_out(out)
    routes = route_overrides(overrides, methods)
    notices = [f"note: {item} is given to {', '.join(takers)} only (the other methods do not declare "
               f"{override_key(item)})" for item, takers in routes if len(takers) < len(methods)]
    runs: List[PlannedRun] = []
    protocol = None
    for method in methods:
        given = [item for item, takers in routes if method in takers]
        cfg = method_config(sources, method, given)
        protocol = protocol or cfg.get("protocol")
        check_method_files(cfg.get("protocol"), [method])
        for seed in seeds or seeds_of(cfg):
            config = {**cfg, "seed": seed}
            runs.append(PlannedRun(len(runs), method, seed, out / method / f"seed{seed}", given, config))
    changed = list(dict.fromkeys(override_key(item) for item in overrides if override_key(item) in PROTOCOL_KEYS))
    if changed and protocol:
        notices.append(f"note: the overrides set protocol key(s) {', '.join(changed)}: where they differ from protocol "
                       f"{protocol}, the runs depart from it and their results.json says so")
    return Plan(sources, out, runs, protocol, notices)


def override_key(item: str) -> str:
    key = item.split("=", 1)[0].strip()
    return ALIASES.get(key, key)


# ---------------------------------------------------------------- the state of a run directory


def config_differences(run: PlannedRun) -> List[str]:
    """Where the run already in run.dir was made with other values than this sweep gives."""
    path = run.dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        theirs = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ["its config.yaml cannot be read"]
    ours = yaml.safe_load(yaml.safe_dump(run.config, sort_keys=False))
    return [f"{key}={theirs[key]!r} (this sweep: {value!r})" for key, value in ours.items()
            if isinstance(theirs, dict) and key in theirs and key not in RESULT_NEUTRAL_KEYS and theirs[key] != value]
