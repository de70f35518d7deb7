#!/usr/bin/env python3
"""How deep the client's modules import each other: the longest chain A -> B -> C ... of
intra-package imports among `client/*.py` (relative `from .x import` / `from . import x` and
absolute `parley.client.x`, at any level of the module, `TYPE_CHECKING` blocks included).
`__main__` (the one-line `python -m` launcher of the CLI) is left out: it adds one to any chain.

The depth is the number of imports in the chain (A -> B -> C is 2). Usage:
`bench/importdepth.py [PACKAGE_DIR]` (default `client/`); prints the depth and one longest
chain. `tests/test_package.py` fails if the client's grows past 6 (it was 7 before issue #13).
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> names of the package's modules it imports."""
    modules = {path.stem: path for path in package.glob("*.py") if path.stem != "__main__"}
    absolute = f"parley.{package.name}"
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1 and not base:  # from . import x, y
                    found |= {alias.name for alias in node.names}
                elif node.level == 1:
                    found.add(base.split(".")[0])
                elif node.level == 0 and base.startswith(absolute + "."):
                    found.add(base[len(absolute) + 1:].split(".")[0])
            elif isinstance(node, ast.Import):
                found |= {a.name[len(absolute) + 1:].split(".")[0] for a in node.names if a.name.startswith(absolute + ".")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """One longest import chain (a list of module names); raises ValueError on an import cycle."""

    @functools.cache
    def chain(name: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        if name in seen:
            raise ValueError(f"import cycle through {name}")
        below = [chain(m, seen | {name}) for m in sorted(graph[name])]
        return (name, *max(below, key=len, default=()))

    return list(max((chain(name) for name in sorted(graph)), key=len, default=()))


def main(argv: list[str]) -> int:
    package = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "client"
    path = longest_chain(import_graph(package))
    print(f"{len(path) - 1} {' -> '.join(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
