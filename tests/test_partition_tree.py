"""The partition tree beyond the admission property in test_core.py: every rule's exact
problem (the operator reads it), building from config specs, the derived views
(requested controls, order, limits), and removing subtrees.

Written against surviving mutants of ``make mutate``: each test pins a behaviour that
a mutant changed without any fast test noticing (docs/testing.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from supervisord_qnx.partition.backend import Control
from supervisord_qnx.partition.tree import Partition, PartitionTree, Problem, build

MiB = 1 << 20
H = frozenset({"hierarchical"})


def tree_of(*nodes: tuple[str, dict[str, object]]) -> PartitionTree:
    t = PartitionTree()
    for path, kw in nodes:
        t.add(Partition(path, **kw), path.rpartition("/")[0])  # type: ignore[arg-type]
    return t


# -- each rule's problem, word for word -------------------------------------------------

RULES = [
    pytest.param(
        [("g", {}), ("g/a", {})],
        [
            Problem(
                "g/a",
                "parent",
                "'g' is not 'hierarchical', so it cannot hold 'g/a'; "
                "add flags = [\"hierarchical\"] to 'g'",
            )
        ],
        id="child-under-flat",
    ),
    pytest.param(
        [("a", {"memory_max": 10 * MiB, "memory_min": 6 * MiB, "memory_reserved": 6 * MiB})],
        [Problem("a", "memory", "min + reserved (6MiB + 6MiB) exceeds max (10MiB)")],
        id="band-over-max",
    ),
    pytest.param(
        [("g", {"flags": H, "memory_max": 64 * MiB}), ("g/a", {"memory_max": 128 * MiB})],
        [Problem("g/a", "memory.max", "max 128MiB of 'g/a' exceeds the max 64MiB in force at 'g'")],
        id="max-over-parent",
    ),
    pytest.param(
        [("g", {"flags": H, "memory_max": 64 * MiB}), ("g/a", {"memory_max": 64 * MiB})],
        [],
        id="max-equal-to-parent",
    ),
    pytest.param(
        [("b", {"cpu_budget": 20.0, "cpu_max": 10.0})],
        [Problem("b", "cpu.max", "cpu.max 10% is below cpu.budget 20%")],
        id="cpu-max-below-budget",
    ),
    pytest.param([("b", {"cpu_budget": 20.0, "cpu_max": 20.0})], [], id="cpu-max-equal-budget"),
    pytest.param(
        [("g", {"flags": H, "cpu_max": 50.0}), ("g/a", {"cpu_max": 60.0})],
        [Problem("g/a", "cpu.max", "cpu.max 60% of 'g/a' exceeds the cpu.max 50% in force at 'g'")],
        id="cpu-max-over-parent",
    ),
    pytest.param(
        [("g", {"flags": H, "cpu_max": 50.0}), ("g/a", {"cpu_max": 50.0}), ("g/b", {})],
        [],
        id="cpu-max-equal-to-parent",
    ),
    pytest.param(
        [("g", {"flags": H, "pids_max": 10}), ("g/a", {"pids_max": 11})],
        [Problem("g/a", "pids", "pids 11 of 'g/a' exceeds the pids 10 in force at 'g'")],
        id="pids-over-parent",
    ),
    pytest.param(
        [("g", {"flags": H, "pids_max": 10}), ("g/a", {"pids_max": 10}), ("g/b", {})],
        [],
        id="pids-equal-to-parent",
    ),
    pytest.param([("a", {"pids_max": 10})], [], id="pids-under-root"),
    pytest.param(
        [
            ("g", {"flags": H, "memory_min": 8 * MiB}),
            ("g/a", {"memory_min": 6 * MiB}),
            ("g/b", {"memory_min": 6 * MiB}),
            ("g/c", {}),
        ],
        [
            Problem(
                "g",
                "memory.min",
                "the children's memory.min add up to 12MiB ('g/a' 6MiB, 'g/b' 6MiB) "
                "but 'g' guarantees only 8MiB",
            )
        ],
        id="mins-over-parent",
    ),
    pytest.param(
        [
            ("g", {"flags": H, "cpu_budget": 30.0}),
            ("g/a", {"cpu_budget": 20.0}),
            ("g/b", {"cpu_budget": 20.0}),
            ("g/c", {}),
        ],
        [
            Problem(
                "g",
                "cpu.budget",
                "the children's cpu.budget add up to 40% ('g/a' 20%, 'g/b' 20%) "
                "but 'g' has a budget of 30% to give",
            )
        ],
        id="budgets-over-parent",
    ),
    pytest.param(
        [("g", {"flags": H}), ("g/a", {"cpu_budget": 0.5})],
        [
            Problem(
                "g",
                "cpu.budget",
                "the children's cpu.budget add up to 0.5% ('g/a' 0.5%) "
                "but 'g' has a budget of 0% to give",
            )
        ],
        id="budget-from-a-parent-without-one",
    ),
    pytest.param(
        [("g", {"flags": H, "cpu_budget": 30.0}), ("g/a", {"cpu_budget": 30.0})],
        [],
        id="budgets-equal-to-parent",
    ),
    pytest.param(
        [("a", {"cpu_budget": 60.0}), ("b", {"cpu_budget": 50.0})],
        [
            Problem(
                "",
                "cpu.budget",
                "the children's cpu.budget add up to 110% ('a' 60%, 'b' 50%) "
                "but the root partition has a budget of 100% to give",
            )
        ],
        id="root-budget-is-the-machine",
    ),
]


@pytest.mark.parametrize(("nodes", "problems"), RULES)
def test_each_rule_reports_its_exact_problem(
    nodes: list[tuple[str, dict[str, object]]], problems: list[Problem]
) -> None:
    assert tree_of(*nodes).admit() == problems


# -- building from config specs ----------------------------------------------------------


@dataclass
class Memory:
    min: int = 0
    max: int | None = None
    reserved: int = 0


@dataclass
class Cpu:
    budget: float | None = None
    max: float | None = None


@dataclass
class Spec:
    name: str
    parent: str = ""
    flags: list[str] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    cpu: Cpu = field(default_factory=Cpu)
    pids: int | None = None


def test_build_carries_every_figure_and_marks_tenants() -> None:
    groups = [
        # Declared child first: build adds in rounds until parents exist.
        Spec("inner", parent="outer", flags=["hierarchical"], memory=Memory(min=8)),
        Spec("outer", flags=["hierarchical", "container"], memory=Memory(8, 100, 0)),
    ]
    tenant = Spec(
        "t",
        parent="outer/inner",
        flags=["memory-isolation"],
        memory=Memory(min=4, max=50, reserved=10),
        cpu=Cpu(budget=0.0, max=20.0),
        pids=7,
    )
    tree, problems = build(groups, [tenant])
    assert problems == []
    assert [p.path for p in tree] == ["outer", "outer/inner", "outer/inner/t"]
    t = tree["outer/inner/t"]
    assert (t.tenant, tree["outer"].tenant, tree["outer/inner"].tenant) == ("t", None, None)
    assert (t.memory_min, t.memory_max, t.memory_reserved) == (4, 50, 10)
    assert (t.cpu_budget, t.cpu_max, t.pids_max) == (0.0, 20.0, 7)
    assert t.flags == frozenset({"memory-isolation"})
    assert tree["outer"].flags == frozenset({"hierarchical", "container"})
    assert [p.path for p in tree.tenants()] == ["outer/inner/t"]


def test_build_reports_duplicates_and_unknown_parents() -> None:
    tree, problems = build(
        [Spec("g", flags=["hierarchical"]), Spec("g")],
        [Spec("a", parent="g"), Spec("lost", parent="nowhere"), Spec("b", parent="nowhere/x")],
    )
    assert problems == [
        Problem("g", "name", "partition 'g' is declared twice"),
        Problem(
            "nowhere/lost",
            "parent",
            "no partition 'nowhere' is declared (declare it as a [[partition]] in the "
            "daemon config)",
        ),
        Problem(
            "nowhere/x/b",
            "parent",
            "no partition 'nowhere/x' is declared (declare it as a [[partition]] in the "
            "daemon config)",
        ),
    ]
    assert [p.path for p in tree] == ["g", "g/a"]


# -- derived views ------------------------------------------------------------------------


def test_requested_controls_name_each_setting() -> None:
    everything = Partition(
        "a",
        flags=frozenset({"memory-isolation", "container"}),
        memory_min=1,
        memory_max=10,
        memory_reserved=1,
        cpu_budget=0.0,
        cpu_max=50.0,
        pids_max=3,
    )
    assert everything.requested_controls() == [
        Control.MEMORY_MIN,
        Control.MEMORY_MAX,
        Control.MEMORY_RESERVED,
        Control.CPU_BUDGET,
        Control.CPU_MAX,
        Control.PIDS,
        Control.MEMORY_ISOLATION,
        Control.CONTAINER,
    ]
    assert Partition("b", flags=H).requested_controls() == []


def test_order_size_and_subtrees() -> None:
    t = tree_of(
        ("g", {"flags": H}),
        ("g/b", {"flags": H}),
        ("g/a", {}),
        ("g/b/x", {}),
        ("gg", {}),
    )
    assert len(t) == 5
    assert [p.path for p in t] == ["g", "gg", "g/a", "g/b", "g/b/x"]
    assert [p.path for p in t.deepest_first()] == ["g/b/x", "g/a", "g/b", "g", "gg"]
    # "gg" shares the prefix "g" but is not under it.
    assert [p.path for p in t.deepest_first("g")] == ["g/b/x", "g/a", "g/b", "g"]
    assert [p.path for p in t.deepest_first("g/b")] == ["g/b/x", "g/b"]
    assert [p.path for p in t["g/b/x"].ancestors()] == ["g/b", "g", ""]
    assert t.root.hierarchical and t.root.cpu_budget == 100.0


def test_remove_takes_the_subtree() -> None:
    t = tree_of(("g", {"flags": H}), ("g/b", {"flags": H}), ("g/b/x", {}), ("g/a", {}))
    t.remove("g/b")
    assert [p.path for p in t] == ["g", "g/a"]
    assert "g/b/x" not in t and "g/b" not in t and "g" in t
    assert list(t["g"].children) == ["a"]
    with pytest.raises(KeyError):
        t.remove("g/b")


def test_as_dict_is_the_tree_with_its_limits() -> None:
    t = tree_of(
        ("g", {"flags": H, "memory_min": 1, "memory_max": 9, "memory_reserved": 2}),
        ("g/a", {"cpu_budget": 5.0, "cpu_max": 7.0, "pids_max": 3, "tenant": "a"}),
    )
    none = {"memory": {"min": 0, "max": None, "reserved": 0}, "cpu": {"budget": None, "max": None}}
    assert t.as_dict() == {
        "path": "",
        "name": "/",
        "tenant": None,
        "flags": ["hierarchical"],
        "limits": {**none, "cpu": {"budget": 100.0, "max": None}, "pids": None},
        "children": [
            {
                "path": "g",
                "name": "g",
                "tenant": None,
                "flags": ["hierarchical"],
                "limits": {
                    "memory": {"min": 1, "max": 9, "reserved": 2},
                    "cpu": {"budget": None, "max": None},
                    "pids": None,
                },
                "children": [
                    {
                        "path": "g/a",
                        "name": "a",
                        "tenant": "a",
                        "flags": [],
                        "limits": {**none, "cpu": {"budget": 5.0, "max": 7.0}, "pids": 3},
                        "children": [],
                    }
                ],
            }
        ],
    }
