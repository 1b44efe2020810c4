"""Numbers of fedtune's import graph (grimp, the graph import-linter checks): modules, module-to-module import
arrows, arrows that point up the layers of pyproject.toml's import-linter "layers" contract, and import cycles.

    python scripts/import_graph.py [--root DIR] [--cycles]

--root: the directory that holds the `fedtune` package to measure (default: this checkout), e.g. a `git worktree`
of an older commit. Function-level imports count; `if TYPE_CHECKING:` imports do not (as import-linter).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layers() -> list[list[str]]:
    """The top-level layers contract, highest first: [[module, sibling, ...], ...]."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    top = next(c for c in cfg if c["type"] == "layers" and not c.get("containers"))
    return [[m.strip() for m in layer.replace(":", "|").split("|")] for layer in top["layers"]]


def layer_of(module: str, order: list[list[str]]) -> int | None:
    for i, group in enumerate(order):
        if any(module == m or module.startswith(m + ".") for m in group):
            return i
    return None


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (networkx, a torch dependency)."""
    import networkx as nx

    g = nx.DiGraph((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a))
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def measure(root: Path, order: list[list[str]], *, mapping=lambda m: m) -> dict:
    sys.path.insert(0, str(root))
    import grimp

    graph = grimp.build_graph("fedtune", exclude_type_checking_imports=True)
    arrows = [(a, b) for a in sorted(graph.modules) for b in graph.find_modules_directly_imported_by(a)]
    up = [(a, b) for a, b in arrows
          if (la := layer_of(mapping(a), order)) is not None and (lb := layer_of(mapping(b), order)) is not None
          and lb < la]
    cyc = cycles(graph)
    return {"modules": len(graph.modules), "arrows": len(arrows), "upward_arrows": len(up), "upward": sorted(up),
            "cycles": len(cyc), "largest_cycle": max(map(len, cyc), default=0), "cycle_members": cyc}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--map", type=Path, help="JSON {old module prefix: new module prefix} for an older tree")
    p.add_argument("--cycles", action="store_true", help="list the cycles and upward arrows")
    a = p.parse_args()
    prefixes = json.loads(a.map.read_text()) if a.map else {}

    def mapping(m: str) -> str:  # an older tree's module → where it lives now (longest prefix first)
        for old in sorted(prefixes, key=len, reverse=True):
            if m == old or m.startswith(old + "."):
                return prefixes[old] + m[len(old):]
        return m

    res = measure(a.root.resolve(), layers(), mapping=mapping)
    if not a.cycles:
        res = {k: v for k, v in res.items() if k not in ("upward", "cycle_members")}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
