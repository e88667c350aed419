"""The package's layout rules (README "Layout"): no import circle between its modules, counting imports
inside functions too; the base (`saerl_ray.core`) imports nothing above it; the signal models import only
the base; test helpers stay out of the runtime package."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = Path(__file__).resolve().parents[1] / "saerl_ray"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every saerl_ray module this file imports, anywhere in it (`from a import b` counts a.b when a.b is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saerl_ray"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or ({node.module} & modules)
    return out


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    g = nx.DiGraph()
    for name, path in files.items():
        g.add_node(name)
        g.add_edges_from((name, dep) for dep in imports_of(path, set(files)) if dep != name)
    return g


def test_no_import_circle(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {cycles[:5]}"


@pytest.mark.parametrize("layer, allowed", [
    ("saerl_ray.core", ("saerl_ray.core",)),
    ("saerl_ray.signal_models", ("saerl_ray.core", "saerl_ray.signal_models")),
    ("saerl_ray.sampler", ("saerl_ray.core", "saerl_ray.sampler")),
])
def test_lower_layers_import_nothing_above_them(graph, layer, allowed):
    bad = [(a, b) for a, b in graph.edges if a.startswith(layer + ".") and b != "saerl_ray"
           and not b.startswith(allowed)]
    assert not bad, f"{layer} imports above itself: {bad}"


def test_test_helpers_are_not_in_the_runtime_package():
    names = {p.stem for p in PKG.rglob("*.py")}
    assert not names & {"testing", "testkit", "sampler_drill"}
