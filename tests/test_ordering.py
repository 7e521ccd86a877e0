"""The ``after`` graph (config/ordering.py, pure) and what the loader and ``--check`` make
of a wrong one: unknown names and cycles are located errors naming every file involved."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.config.ordering import Ordering, Problem, cycles, problems

# -- the graph ---------------------------------------------------------------------------


def test_after_and_before_answer_both_directions() -> None:
    g = Ordering({"web": ["db", "cache"], "db": [], "cache": ["db"], "batch": []})
    assert g.after("web") == ("db", "cache")
    assert g.before("db") == ("cache", "web")
    assert g.before("web") == () and g.after("batch") == ()
    # Restricted to the tenants being started or stopped together.
    assert g.after("web", among={"web", "cache"}) == ("cache",)
    assert g.before("db", among={"db", "web"}) == ("web",)


def test_waves_start_each_tenant_after_the_ones_it_waits_for() -> None:
    g = Ordering({"a": [], "b": ["a"], "c": ["b"], "x": [], "y": ["a", "x"]})
    assert g.waves(["c", "b", "a", "x", "y"]) == [["a", "x"], ["b", "y"], ["c"]]
    # Only the given tenants count: c without b does not wait for anything.
    assert g.waves(["c", "x"]) == [["c", "x"]]


def test_unknown_names_are_ignored_by_the_graph() -> None:
    # The loader reports them; a graph built anyway must not trip over them.
    g = Ordering({"a": ["ghost", "a"]})
    assert g.after("a") == () and g.waves(["a"]) == [["a"]]


def test_cycles_are_found_with_the_path_that_closes_them() -> None:
    assert cycles({"a": ["b"], "b": ["a"]}) == [["a", "b", "a"]]
    assert cycles({"a": ["a"]}) == [["a", "a"]]
    assert cycles({"a": ["c"], "b": ["a"], "c": ["b"], "d": ["a"]}) == [["a", "c", "b", "a"]]
    # Two separate loops, one entry each; a tenant merely after a loop is not on it.
    two = {"a": ["b"], "b": ["a"], "x": ["y"], "y": ["z"], "z": ["x"], "w": ["x"]}
    assert cycles(two) == [["a", "b", "a"], ["x", "y", "z", "x"]]
    assert cycles({"a": [], "b": ["a"]}) == []


def test_a_long_chain_needs_no_recursion() -> None:
    n = 5000  # deeper than Python's recursion limit
    after = {f"t{i}": [f"t{i + 1}"] for i in range(n)} | {f"t{n}": ["t0"]}
    [cycle] = cycles(after)
    assert len(cycle) == n + 2 and cycle[0] == cycle[-1] == "t0"


def test_problems_name_the_tenant_whose_file_to_edit() -> None:
    found = problems({"a": ["b"], "b": ["a", "ghost", "a"], "c": ["broken"]}, known={"broken"})
    assert found == [
        Problem("a", "cycle: a -> b -> a"),
        Problem("b", "no tenant named 'ghost' (tenants: a, c)"),
        Problem("b", "'a' is listed twice"),
        Problem("b", "cycle: a -> b -> a"),
    ]


@given(
    st.dictionaries(
        st.sampled_from("abcdefg"), st.lists(st.sampled_from("abcdefg"), max_size=3), max_size=7
    )
)
def test_waves_exist_exactly_when_there_is_no_cycle(after: dict[str, list[str]]) -> None:
    g = Ordering(after)
    # A tenant after itself is a config error the graph ignores (it cannot wait for itself).
    if cycles({name: [d for d in deps if d != name] for name, deps in after.items()}):
        with pytest.raises(ValueError, match="cycle: "):
            g.waves(after)
        return
    waves = g.waves(after)
    wave_of = {name: i for i, wave in enumerate(waves) for name in wave}
    assert sorted(wave_of) == sorted(after)
    for name in after:
        for dep in g.after(name):
            assert wave_of[dep] < wave_of[name]


# -- the loader and --check ------------------------------------------------------------------

GROUP = '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
W = '[[worker]]\nname = "w"\ncommand = ["true"]\n'


def tenants_dir(root: Path, tenants: dict[str, str]) -> Path:
    (root / "tenants.d").mkdir(parents=True, exist_ok=True)
    for name, body in tenants.items():
        (root / "tenants.d" / f"{name}.toml").write_text(textwrap.dedent(body))
    path = root / "d.toml"
    path.write_text('[daemon]\nbackend = "portable"\n' + GROUP)
    return path


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(p) for p in info.value.problems]


def test_a_cycle_is_an_error_in_every_file_on_it(tmp_path: Path) -> None:
    path = tenants_dir(
        tmp_path,
        {
            "a": 'after = ["c"]\n' + W,
            "b": 'after = ["a"]\n' + W,
            "c": 'after = ["b"]\n' + W,
            "d": 'after = ["a"]\n' + W,  # after the loop, not on it
        },
    )
    d = tmp_path / "tenants.d"
    assert load_problems(path) == [
        f"{d}/a.toml: after: cycle: a -> c -> b -> a",
        f"{d}/b.toml: after: cycle: a -> c -> b -> a",
        f"{d}/c.toml: after: cycle: a -> c -> b -> a",
    ]


def test_unknown_and_malformed_names_are_errors(tmp_path: Path) -> None:
    path = tenants_dir(
        tmp_path,
        {
            "web": 'after = ["dbb"]\n' + W,
            "db": 'after = ["bad name"]\n' + W,
            # A file that fails for its own reason: naming it is not a second error.
            "broken": "memroy = 1\n" + W,
            "api": 'after = ["broken"]\n' + W,
        },
    )
    d = tmp_path / "tenants.d"
    found = load_problems(path)
    assert f"{d}/web.toml: after: no tenant named 'dbb' (tenants: api)" in found
    assert [p for p in found if p.startswith(f"{d}/db.toml: after[0]: String should match")]
    assert [p for p in found if p.startswith(f"{d}/broken.toml: memroy: unknown key")]
    assert not [p for p in found if p.startswith(f"{d}/api.toml")]
    assert len(found) == 3, found


def test_a_valid_order_loads(tmp_path: Path) -> None:
    path = tenants_dir(tmp_path, {"a": W, "b": 'after = ["a"]\n' + W})
    config = load(path)
    assert {t.name: t.after for t in config.tenants} == {"a": [], "b": ["a"]}


@pytest.mark.integration
def test_check_shows_cycles_and_unknown_names(tmp_path: Path) -> None:
    path = tenants_dir(
        tmp_path,
        {"a": 'after = ["b"]\n' + W, "b": 'after = ["a"]\n' + W, "c": 'after = ["zz"]\n' + W},
    )
    daemon = str(Path(sys.executable).parent / "supervisord-qnx")
    res = subprocess.run(
        [daemon, "--config", str(path), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stdout + res.stderr
    d = tmp_path / "tenants.d"
    assert res.stderr.splitlines() == [
        f"{d}/a.toml: after: cycle: a -> b -> a",
        f"{d}/b.toml: after: cycle: a -> b -> a",
        f"{d}/c.toml: after: no tenant named 'zz' (tenants: a, b)",
        "3 problems; nothing was started.",
    ]


@pytest.mark.integration
def test_check_prints_the_start_order(tmp_path: Path) -> None:
    path = tenants_dir(
        tmp_path,
        {"a": W, "b": 'after = ["a"]\n' + W, "c": 'after = ["b"]\n' + W, "x": W},
    )
    daemon = str(Path(sys.executable).parent / "supervisord-qnx")
    res = subprocess.run(
        [daemon, "--config", str(path), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "  1. a, x\n  2. b\n  3. c\n" in res.stdout
    res = subprocess.run(
        [daemon, "--config", str(path), "--check", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(res.stdout)["start_waves"] == [["a", "x"], ["b"], ["c"]]
