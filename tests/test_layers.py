"""Imports run one way: a module imports only from its own layer or lower ones, and no import cycles.

The layers are README.md's "Layout", lowest first. Every import is counted, including the lazy
ones inside functions (they run up a layer just the same when they run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "gptoss_convert"

# Lowest first. A module belongs to the longest entry naming it or a package above it; the bare
# package name stands for its __init__ only (the version and the lazy public API).
LAYERS = [
    [PKG, f"{PKG}.errors", f"{PKG}.tree", f"{PKG}.faults", f"{PKG}.buffers", f"{PKG}.progress", f"{PKG}.finite"],
    [f"{PKG}.mxfp4", f"{PKG}.fp8"],
    [f"{PKG}.io"],
    [f"{PKG}.mapping"],
    [f"{PKG}.backends.common"],
    [f"{PKG}.backends"],
    [f"{PKG}.testing"],
    [f"{PKG}.converters"],
    [f"{PKG}.loading"],
    [f"{PKG}.verify", f"{PKG}.generate", f"{PKG}.demo"],
    [f"{PKG}.cli", f"{PKG}.__main__"],
]


def package_sources() -> dict[str, str]:
    """{dotted module name: source} for every module of the package."""
    out = {}
    for f in sorted((ROOT / PKG).rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f.read_text()
    return out


def imports_of(module: str, source: str, modules: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in `source`; `from P import m` counts as P.m
    when that is a module, else as P."""
    found = set()
    is_pkg = any(m.startswith(module + ".") for m in modules)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != module}


def layer_of(module: str) -> int | None:
    best = None
    for rank, entries in enumerate(LAYERS):
        for e in entries:
            if module == e or (e != PKG and module.startswith(e + ".")):
                if best is None or len(e) > best[0]:
                    best = (len(e), rank)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, and every module in no layer."""
    problems = [f"{m} is in no layer: add it to LAYERS here and to README's Layout" for m in graph
                if layer_of(m) is None]
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if None not in (layer_of(m), layer_of(d)) and layer_of(d) > layer_of(m):
                problems.append(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})")
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}      # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = package_sources()
    return {m: imports_of(m, src, set(sources)) for m, src in sources.items()}


def test_no_import_runs_up_a_layer(graph):
    assert len(graph) > 40 and graph[f"{PKG}.cli"]        # the walk found the package and its imports
    assert upward_imports(graph) == []


def family_of(module: str) -> str | None:
    """The model family folder `module` is in (backends/<family>/), or None."""
    parts = module.split(".")
    if len(parts) > 3 and parts[1] == "backends" and parts[2] != "common":
        return parts[2]
    return None


def cross_family_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from one family's folder into another's (shared parts live in backends/common)."""
    return [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
            if family_of(m) and family_of(d) and family_of(m) != family_of(d)]


def test_no_family_imports_another(graph):
    assert {family_of(m) for m in graph} >= {"gpt_oss", "qwen3_moe", None}
    assert cross_family_imports(graph) == []
    crossed = {**graph, f"{PKG}.backends.qwen3_moe.model": graph[f"{PKG}.backends.qwen3_moe.model"]
               | {f"{PKG}.backends.gpt_oss.model"}}
    assert cross_family_imports(crossed) == [f"{PKG}.backends.qwen3_moe.model imports {PKG}.backends.gpt_oss.model"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None


def test_the_checks_catch_an_upward_import_and_a_cycle(graph):
    """The same checks on the real graph plus one bad import each (a checker that never fires
    would pass the two tests above)."""
    up = {**graph, f"{PKG}.io.files": graph[f"{PKG}.io.files"] | {f"{PKG}.converters.plan"}}
    assert upward_imports(up) == [f"{PKG}.io.files (layer 2) imports {PKG}.converters.plan (layer 7)"]
    looped = {**graph, f"{PKG}.converters.plan": graph[f"{PKG}.converters.plan"] | {f"{PKG}.converters.common"}}
    cycle = find_cycle(looped)
    assert cycle[0] == cycle[-1] and set(cycle) == {f"{PKG}.converters.common", f"{PKG}.converters.plan"}


def test_imports_of_resolves_submodules_and_relative_imports():
    modules = {"p", "p.a", "p.a.x", "p.b", "p.b.y"}
    src = ("from p.a import x, helper\nimport p.b\ndef f():\n    from ..b import y\n    from .. import b\n"
           "    from . import x\n")
    assert imports_of("p.a.z", src, modules | {"p.a.z"}) == {"p.a.x", "p.a", "p.b", "p.b.y"}


COMMANDS = {f"{PKG}.converters.{m}" for m in ("to_orbax", "dequantize", "to_hf", "merge_lora", "check")}


def test_no_command_imports_another_command():
    """Commands share the protocol one floor down (converters/job.py, the targets, the sources),
    never each other's modules: that is how the copies drifted."""
    sources = package_sources()
    modules = set(sources)
    assert COMMANDS <= modules
    found = {c: imports_of(c, sources[c], modules) & (COMMANDS - {c}) for c in COMMANDS}
    assert found == {c: set() for c in COMMANDS}
