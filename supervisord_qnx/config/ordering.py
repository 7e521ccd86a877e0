"""The ``after`` graph between tenants. Pure: names in, names out.

A tenant file may say ``after = ["db", "cache"]``: its workers are started only once
those tenants' workers run, and stopped only once they are down (systemd's
``After=``, with its reverse for stopping). This module answers the questions the
loader and the supervisor ask of that graph, and nothing else:

* is it well formed? (every name known, no cycle): ``problems``;
* whom must a tenant wait for before starting, and who must be down before it stops
  (``Ordering.after`` and ``Ordering.before``, restricted to a set of tenants being
  started or stopped together);
* in which waves would a set of tenants start (``Ordering.waves``: each wave only
  waits for earlier ones; for ``--check`` output and the tests).

It lives with the config, not with the supervisor, because a cycle is a config error:
the loader must find it before anything starts, and imports point down (supervise
uses config, never the reverse).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One tenant's ``after`` is wrong: the tenant (whose file to edit) and why."""

    tenant: str
    reason: str


class Ordering:
    """The ``after`` relation of one config: ``after[x]`` are the tenants ``x`` starts after.

    Names that are not tenants (``problems`` reports them) are ignored here, so that
    a caller holding a graph never trips over them."""

    def __init__(self, after: Mapping[str, Sequence[str]]) -> None:
        names = set(after)
        self._after: dict[str, tuple[str, ...]] = {
            name: tuple(dict.fromkeys(d for d in deps if d in names and d != name))
            for name, deps in after.items()
        }
        before: dict[str, list[str]] = {name: [] for name in after}
        for name, deps in self._after.items():
            for dep in deps:
                before[dep].append(name)
        self._before = {name: tuple(sorted(v)) for name, v in before.items()}

    def after(self, name: str, among: Collection[str] | None = None) -> tuple[str, ...]:
        """The tenants ``name`` starts after (that must run first), optionally only those
        in ``among``."""
        deps = self._after.get(name, ())
        return deps if among is None else tuple(d for d in deps if d in among)

    def before(self, name: str, among: Collection[str] | None = None) -> tuple[str, ...]:
        """The tenants that start after ``name`` (that must be stopped before it)."""
        deps = self._before.get(name, ())
        return deps if among is None else tuple(d for d in deps if d in among)

    def waves(self, names: Iterable[str]) -> list[list[str]]:
        """``names`` in start waves: a tenant's wave comes after the waves of every tenant
        of ``names`` it is after; within a wave nothing is ordered (they start together).
        Stopping runs the waves backwards. Raises ``ValueError`` on a cycle."""
        todo = list(dict.fromkeys(names))
        among = set(todo)
        depth: dict[str, int] = {}
        for name in todo:
            self._depth(name, among, depth, [])
        out: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for name in todo:
            out[depth[name]].append(name)
        return out

    def _depth(self, name: str, among: set[str], depth: dict[str, int], path: list[str]) -> int:
        if name in depth:
            return depth[name]
        if name in path:
            raise ValueError("cycle: " + " -> ".join([*path[path.index(name) :], name]))
        path.append(name)
        d = 1 + max(
            (self._depth(x, among, depth, path) for x in self.after(name, among)), default=-1
        )
        path.pop()
        depth[name] = d
        return d


def cycles(after: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Every cycle of the relation, one per strongly connected part, each as the path
    that closes it (``[a, b, a]``), starting at its alphabetically first tenant; a
    tenant after itself is the cycle ``[a, a]``. Names that are not tenants are ignored."""
    names = set(after)
    edges = {n: sorted({d for d in deps if d in names}) for n, deps in after.items()}
    found: list[list[str]] = []
    for part in _strongly_connected(edges):
        first = min(part)
        if len(part) == 1 and first not in edges[first]:
            continue
        found.append(_closing_path(first, set(part), edges))
    return sorted(found)


def problems(after: Mapping[str, Sequence[str]], known: Collection[str] = ()) -> list[Problem]:
    """What is wrong with ``after`` (tenant -> the names its file lists), in tenant
    order: a name that is no tenant (``known`` are names declared by files that failed
    to load: they are that file's problem, not this one's), a name listed twice, and
    every cycle, reported once in the file of each tenant on it."""
    out: list[Problem] = []
    tenants = sorted(after)
    for name in tenants:
        seen: set[str] = set()
        for dep in after[name]:
            if dep in seen:
                out.append(Problem(name, f"'{dep}' is listed twice"))
            seen.add(dep)
            if dep not in after and dep not in known:
                listing = ", ".join(t for t in tenants if t != name) or "none"
                out.append(Problem(name, f"no tenant named '{dep}' (tenants: {listing})"))
    on_cycle: dict[str, list[str]] = {}
    for cycle in cycles(after):
        text = "cycle: " + " -> ".join(cycle)
        for member in cycle[:-1]:
            on_cycle.setdefault(member, []).append(text)
    for name in tenants:
        out.extend(Problem(name, text) for text in on_cycle.get(name, []))
    rank = {name: i for i, name in enumerate(tenants)}
    return sorted(out, key=lambda p: rank[p.tenant])


def _strongly_connected(edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (a chain of a thousand tenants must not hit
    Python's recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    parts: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            succ = edges[v]
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                part = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    part.append(w)
                    if w == v:
                        break
                parts.append(part)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return parts


def _closing_path(start: str, part: set[str], edges: Mapping[str, Sequence[str]]) -> list[str]:
    """A shortest path from ``start`` back to itself inside one strongly connected part
    (breadth first, alphabetical), so the message shows the loop an operator must cut."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w not in part:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover - callers check
