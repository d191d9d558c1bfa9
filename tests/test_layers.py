"""The package's layering (README "Architecture"): every import of a dynammo module, at the top of a
file or inside a function, goes from a higher layer down, and no two modules or packages import each
other, directly or through others. Read from the source files' import statements."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dynammo"

# bottom to top; a package (name/) is one unit. A module may import from its own layer or below.
LAYERS = [
    ["errors", "console", "signals", "prediction", "metrics", "registry", "io", "distributed", "compute",
     "export_archive", "sealing", "openset", "batch", "global_batchnorm", "journal", "config"],
    ["config_yaml", "optim", "data/"],
    ["models/", "engine", "predict_images"],
    ["methods/"],
    ["protocols", "cost", "assembly"],
    ["configure", "cost_parts"],
    ["rundir"],
    ["reporting/"],
    ["run/"],
    ["sweep/", "pretrain/", "deploy"],
    ["cli"],
    ["legacy", "__main__"],
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit_of(module: str):
    """dynammo.run.loop -> 'run/', dynammo.engine -> 'engine', dynammo -> None."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "dynammo":
        return None
    return parts[1] + "/" if (SRC / parts[1]).is_dir() else parts[1]


def exists(unit: str) -> bool:
    """A module or package of the source tree (not a name imported from one)."""
    return (SRC / unit.rstrip("/")).is_dir() if unit.endswith("/") else (SRC / f"{unit}.py").is_file()


def import_edges() -> dict:
    """{unit: {units it imports}} over every .py file under src/dynammo."""
    edges: dict = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        source = unit_of(".".join(p for p in parts if p != "__init__"))
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = unit_of(name)
                if target and target != source and exists(target):
                    edges.setdefault(source, set()).add(target)
    return edges


def test_every_module_has_a_layer():
    units = {unit_of("dynammo." + (p.stem if p.is_file() else p.name)) for p in SRC.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    missing = sorted(u for u in units if u not in LAYER_OF)
    assert not missing, f"place {missing} in a layer of tests/test_layers.py LAYERS (and the README's picture)"


def test_imports_only_go_down_or_sideways():
    up = [f"{a} (layer {LAYER_OF[a]}) imports {b} (layer {LAYER_OF[b]})"
          for a, targets in import_edges().items() for b in targets
          if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a]]
    assert not up, "imports that run back up: " + "; ".join(sorted(up))


def test_no_import_circles():
    edges = import_edges()
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above read real files: an engine that imported the runner package would fail both."""
    import shutil

    copy = tmp_path / "dynammo"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    engine = copy / "engine.py"
    engine.write_text(engine.read_text(encoding="utf-8") + "\nfrom dynammo.run import seeds_of  # noqa\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "SRC", copy)
    edges = import_edges()
    assert "run/" in edges["engine"]
    with pytest.raises(AssertionError, match="engine .* imports run/"):
        test_imports_only_go_down_or_sideways()
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circles()
