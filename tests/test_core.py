"""The pure core: sizes, config models and their located errors, the partition tree's
admission rules, the worker state table and the restart policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.config.model import RestartSpec
from supervisord_qnx.exits import ExitReason
from supervisord_qnx.partition import tree as ptree
from supervisord_qnx.partition.backend import Control
from supervisord_qnx.supervise.policy import RestartTracker, Verdict
from supervisord_qnx.units import format_size, parse_size

# -- sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [("16MiB", 16 << 20), ("4M", 4 << 20), ("4MB", 4 << 20), ("512k", 512 << 10), (1024, 1024),
     ("1.5GiB", 3 << 29), ("0", 0)],
)  # fmt: skip
def test_parse_size(text: object, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["16 potatoes", "-1M", -5, True, 1.5, "M"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]


@given(st.integers(min_value=1, max_value=1023), st.integers(min_value=0, max_value=5))
def test_format_size_writes_whole_units_exactly(k: int, power: int) -> None:
    # Every example is a whole number of some unit (the old test drew arbitrary
    # integers and asserted only when the text happened to have no decimal point).
    n = k * 1024**power
    text = format_size(n)
    assert text == f"{k}{UNITS[power]}"
    assert parse_size(text) == n


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_is_within_a_rounding_step_of_any_value(n: int) -> None:
    text = format_size(n)
    power = max((p for p in range(6) if 1024**p <= n), default=0)
    number, unit = text[: -len(UNITS[power])], text[-len(UNITS[power]) :]
    assert unit == UNITS[power], text  # the largest unit the value reaches
    # One decimal at most: off by at most half a tenth of the unit (plus the byte that
    # parse_size's truncation can lose).
    assert len(number.partition(".")[2]) <= 1, text
    assert abs(parse_size(text) - n) <= 0.05 * 1024**power + 1, text


# -- config files ------------------------------------------------------------------


def write(root: Path, daemon: str, tenants: dict[str, str]) -> Path:
    (root / "tenants.d").mkdir(parents=True, exist_ok=True)
    for name, body in tenants.items():
        (root / "tenants.d" / f"{name}.toml").write_text(body)
    path = root / "d.toml"
    path.write_text(daemon)
    return path


GROUP = '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
W = '[[worker]]\nname = "w"\ncommand = ["true"]\n'


def test_relative_paths_resolve_against_the_naming_file(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            '[daemon]\nsocket = "run/c.sock"\n' + GROUP,
            {"a": '[[worker]]\nname = "w"\ncommand = ["x"]\ncwd = "../work"\n'},
        )
    )
    assert cfg.daemon.socket == tmp_path / "run" / "c.sock"
    assert cfg.tenants[0].worker[0].cwd == tmp_path / "work"
    assert cfg.tenants[0].name == "a"  # named after its file
    assert cfg.tenants[0].path == "tenants/a"


def test_every_problem_is_listed_with_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GROUP,
        {
            "a": 'memory = { max = "1M", min = "2M" }\n' + W,
            "b": "autostart = 3\n" + W + 'stop_signal = "SIGNOPE"\n',
            "c": "[[worker]]\nname = 'w'\n",
        },
    )
    with pytest.raises(ConfigError) as exc:
        load(path)
    text = [str(p) for p in exc.value.problems]
    a, b, c = (str(tmp_path / "tenants.d" / f"{n}.toml") for n in "abc")
    assert any(t.startswith(f"{a}: memory: ") and "exceeds max" in t for t in text)
    assert any(t.startswith(f"{b}: autostart: ") for t in text)
    assert any(t.startswith(f"{b}: worker[0].stop_signal: ") and "SIGNOPE" in t for t in text)
    assert any(t.startswith(f"{c}: worker[0].command: ") and "required" in t for t in text)


def test_daemon_file_problems_are_located(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nbackend = "magic"\nsockett = "x"\n', {})
    with pytest.raises(ConfigError) as exc:
        load(path)
    keys = {p.key for p in exc.value.problems}
    assert keys == {"daemon.backend", "daemon.sockett"}


def test_unknown_parent_and_duplicate_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GROUP,
        {"a": 'parent = "nowhere"\n' + W, "b": 'name = "c"\n' + W, "c": W},
    )
    with pytest.raises(ConfigError) as exc:
        load(path)
    reasons = " | ".join(str(p) for p in exc.value.problems)
    assert "no partition 'nowhere' is declared" in reasons
    assert "tenant 'c' is already defined" in reasons


# -- the partition tree ------------------------------------------------------------


def node(path: str, **kw: object) -> ptree.Partition:
    return ptree.Partition(path, **kw)  # type: ignore[arg-type]


def tree_of(*nodes: tuple[str, dict[str, object]]) -> ptree.PartitionTree:
    t = ptree.PartitionTree()
    for path, kw in nodes:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        t.add(node(path, **kw), parent)
    return t


H = frozenset({"hierarchical"})


def test_child_max_above_parent_names_both_and_numbers() -> None:
    t = tree_of(("g", {"flags": H, "memory_max": 64 << 20}), ("g/a", {"memory_max": 128 << 20}))
    [p] = t.admit()
    assert p.partition == "g/a" and p.key == "memory.max"
    assert "128MiB" in p.reason and "64MiB" in p.reason and "'g'" in p.reason


def test_children_min_and_budget_sums() -> None:
    t = tree_of(
        ("g", {"flags": H, "memory_min": 8 << 20, "cpu_budget": 30.0}),
        ("g/a", {"memory_min": 6 << 20, "cpu_budget": 20.0}),
        ("g/b", {"memory_min": 6 << 20, "cpu_budget": 20.0}),
    )
    problems = {p.key: p for p in t.admit()}
    assert set(problems) == {"memory.min", "cpu.budget"}
    assert "12MiB" in problems["memory.min"].reason and "8MiB" in problems["memory.min"].reason
    assert "40%" in problems["cpu.budget"].reason and "30%" in problems["cpu.budget"].reason


def test_root_budget_is_the_machine() -> None:
    t = tree_of(("a", {"cpu_budget": 60.0}), ("b", {"cpu_budget": 50.0}))
    [p] = t.admit()
    assert p.key == "cpu.budget" and "110%" in p.reason and "100%" in p.reason


def test_children_only_under_hierarchical() -> None:
    t = tree_of(("g", {}), ("g/a", {}))
    [p] = t.admit()
    assert p.key == "parent" and "hierarchical" in p.reason


def test_reserved_band_and_cpu_max() -> None:
    t = tree_of(
        ("a", {"memory_max": 10, "memory_min": 6, "memory_reserved": 6}),
        ("b", {"cpu_budget": 20.0, "cpu_max": 10.0}),
    )
    keys = sorted(p.key for p in t.admit())
    assert keys == ["cpu.max", "memory"]


def test_effective_limits_and_order() -> None:
    t = tree_of(
        ("g", {"flags": H, "memory_max": 100, "pids_max": 5}),
        ("g/a", {"memory_max": 200}),  # violates, but effective max is still the tighter
        ("g/b", {}),
    )
    assert t["g/a"].effective_memory_max == 100
    assert t["g/b"].effective_pids_max == 5
    assert [p.path for p in t] == ["g", "g/a", "g/b"]
    assert [p.path for p in t.deepest_first()] == ["g/a", "g/b", "g"]
    assert t["g/a"].requested_controls() == [Control.MEMORY_MAX]


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    """Up to 6 children of one group: (min, max, reserved, budget) in small units."""
    return draw(
        st.lists(
            st.tuples(st.integers(0, 8), st.integers(0, 16), st.integers(0, 8), st.integers(0, 50)),
            max_size=6,
        )
    )


@given(st.integers(0, 32), st.integers(1, 32), st.integers(0, 100), trees())
def test_admission_matches_the_rules(
    gmin: int, gmax: int, gbudget: int, children: list[tuple[int, int, int, int]]
) -> None:
    """Admission accepts a tree exactly when every stated rule holds."""
    t = ptree.PartitionTree()
    t.add(node("g", flags=H, memory_min=gmin, memory_max=max(gmax, gmin),
               cpu_budget=float(gbudget)), "")  # fmt: skip
    for i, (mn, mx, rs, bd) in enumerate(children):
        t.add(node(f"g/c{i}", memory_min=mn, memory_max=mx, memory_reserved=rs,
                   cpu_budget=float(bd)), "g")  # fmt: skip
    gm = max(gmax, gmin)
    ok = (
        all(mn + rs <= mx and mx <= gm for mn, mx, rs, _ in children)
        and sum(c[0] for c in children) <= gmin
        and sum(c[3] for c in children) <= gbudget
    )
    assert (t.admit() == []) == ok


# -- restart policy -----------------------------------------


def test_backoff_doubles_and_caps_then_fatal() -> None:
    t = RestartTracker(RestartSpec(backoff_initial=0.1, backoff_max=0.5, max_restarts=4, window=60))
    delays = [t.decide(ExitReason.parse("exit:1"), now=i, uptime=0.01).delay for i in range(4)]
    assert delays == [0.1, 0.2, 0.4, 0.5]
    assert t.decide(ExitReason.parse("exit:1"), now=5, uptime=0.01).verdict is Verdict.FATAL


def test_window_slides_and_stable_run_resets_backoff() -> None:
    t = RestartTracker(RestartSpec(backoff_initial=1, backoff_max=4, max_restarts=2, window=10))
    assert t.decide(ExitReason.parse("signal:SIGKILL"), 0, 0.1).verdict is Verdict.RESTART
    assert t.decide(ExitReason.parse("signal:SIGKILL"), 1, 0.1).verdict is Verdict.RESTART
    # Both earlier restarts fell out of the window; a long (healthy) run restarts at once,
    # and a short one right after it starts the backoff over from backoff_initial.
    d = t.decide(ExitReason.parse("signal:SIGKILL"), 20, uptime=100)
    assert d.verdict is Verdict.RESTART and d.delay == 0
    d = t.decide(ExitReason.parse("signal:SIGKILL"), 20.5, uptime=0.5)
    assert d.verdict is Verdict.RESTART and d.delay == 1


@pytest.mark.parametrize(
    "policy,reason,verdict",
    [("never", "exit:1", Verdict.FINAL), ("on-failure", "exit:0", Verdict.FINAL),
     ("on-failure", "memory-limit", Verdict.RESTART), ("always", "exit:0", Verdict.RESTART)],
)  # fmt: skip
def test_policies(policy: str, reason: str, verdict: Verdict) -> None:
    t = RestartTracker(RestartSpec(policy=policy))  # type: ignore[arg-type]
    assert t.decide(ExitReason.parse(reason), 0, 1).verdict is verdict
