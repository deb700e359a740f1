"""The import graph of ``napari_openseg.core``: capabilities import the shared modules, never the reverse,
and no two capabilities import each other. ``python -m tests.test_layers`` prints the graph."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import napari_openseg.core

CORE = Path(napari_openseg.core.__file__).parent
SHARED = "shared"


def _part(module: str) -> str | None:
    """``napari_openseg.core.<capability>...`` -> the capability, another core module -> shared."""
    parts = module.split(".")
    if parts[:2] != ["napari_openseg", "core"] or len(parts) < 3:
        return None
    return parts[2] if (CORE / parts[2]).is_dir() else SHARED


def import_graph() -> dict[str, set[str]]:
    """Which part of core imports which (every import statement, deferred ones included)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in CORE.rglob("*.py"):
        inner = path.relative_to(CORE).parts
        source = inner[0] if len(inner) > 1 else SHARED
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = _part(name)
                if target is not None and target != source:
                    edges[source].add(target)
    return dict(edges)


def test_the_shared_modules_import_no_capability():
    assert import_graph().get(SHARED, set()) == set()


def test_no_two_capabilities_import_each_other():
    graph = import_graph()
    both = {(a, b) for a, targets in graph.items() for b in targets if a in graph.get(b, set())}
    assert both == set()


def test_every_capability_is_a_subpackage_the_graph_sees():
    assert {"segment", "propagate", "novelty", "cohort"} <= {p.name for p in CORE.iterdir() if p.is_dir()}
    assert import_graph()["segment"] >= {SHARED}


if __name__ == "__main__":
    for part, targets in sorted(import_graph().items()):
        print(f"{part:9} -> {', '.join(sorted(targets))}")
