"""No import cycles inside the `ingestd` package.

The graph is built with `ast` from every module under src/ingestd: every `import` and
`from ... import` counts, wherever it stands - at module level, under
`if TYPE_CHECKING:`, inside a function (a lazy import hides a cycle, it does not remove
it) or in a try block. `from pkg import name` is an edge to `pkg.name` when that is a
module of the package, else to `pkg`. The implicit import of a module's parent packages
is not an edge (otherwise every package whose `__init__` imports its submodules would be
a cycle).
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ingestd"

# Cycles that exist in code outside this test's author's remit, by their exact set of
# modules: any other cycle fails, and so does an entry here once its cycle is gone.
# The simulator's venues import `merge_streams` lazily from the server, which imports
# the venue registry.
# The simulator's venues name the server's connection type for type checking only
# (`if TYPE_CHECKING:`); their runtime imports no longer cycle (merge_streams moved to
# ingestd.sim.merge). Not daemon code. The test fails once this is gone, too.
KNOWN_CYCLES: list[frozenset[str]] = [
    frozenset({"ingestd.sim.server", "ingestd.sim.venues", "ingestd.sim.venues.base",
               *(f"ingestd.sim.venues.{v}" for v in (
                   "binance", "bitstamp", "bybit", "coinbase", "deribit", "kraken", "kucoin",
                   "okx", "gate", "hyperliquid"))}),
]


def modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its file)."""
    mods = modules(src)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        deps.add(f"{target}.{a.name}")
                    elif target in mods:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def a_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp  # pragma: no cover - a component always has a cycle


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "ingestd.config" in graph["ingestd.daemon"]          # module level
    assert "ingestd.sim.server" in graph["ingestd.sim.venues.okx"]  # lazy, in a function
    assert "ingestd.sim.server" in graph["ingestd.sim.venues.base"]  # under TYPE_CHECKING


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = strongly_connected(graph)
    unexpected = [c for c in cycles if not any(frozenset(c) <= k for k in KNOWN_CYCLES)]
    assert not unexpected, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(a_cycle(graph, c))}   (component: {', '.join(c)})"
        for c in unexpected)
    gone = [sorted(k) for k in KNOWN_CYCLES if not any(frozenset(c) & k for c in cycles)]
    assert not gone, f"no longer cycles, remove them from KNOWN_CYCLES: {gone}"
