"""The pure parts of changing a live system: the reload diff, the order of resize writes,
``Limits``, tree copies, ``set`` parameters and the overrides store. No daemon, no I/O
beyond loading config files written to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisord_qnx.config.diff import (
    ConfigDiff,
    Resize,
    diff,
    keep_start_settings,
    not_applied,
    resize_steps,
)
from supervisord_qnx.config.load import load
from supervisord_qnx.config.model import Config
from supervisord_qnx.partition.limits import (
    BadLimits,
    Limits,
    Overrides,
    copy_tree,
    parse_set,
)
from supervisord_qnx.partition.tree import Partition, PartitionTree
from tests.conftest import ConfigDir

MiB = 1 << 20


def write(cfg: ConfigDir, name: str, body: str = "", worker: str = "") -> None:
    cfg.tenant(
        name,
        body + '\n[[worker]]\nname = "w"\ncommand = ["sleep", "1"]\n' + worker,
    )


def loaded(cfg: ConfigDir) -> Config:
    cfg.write()
    return load(cfg.path)


def reload_diff(cfg: ConfigDir, before: Config) -> ConfigDiff:
    after = loaded(cfg)
    return diff(before, before.tree, after, after.tree)


def test_an_identical_config_is_an_empty_diff(cfg: ConfigDir) -> None:
    write(cfg, "alpha", 'memory = { max = "64MiB" }')
    write(cfg, "beta")
    before = loaded(cfg)
    d = diff(before, before.tree, loaded(cfg), loaded(cfg).tree)
    assert d.empty
    assert d.unchanged == ["alpha", "beta"]
    assert d.summary()["unchanged"] == {"count": 2, "names": ["alpha", "beta"]}


def test_only_figures_changed_is_a_resize_and_nothing_else(cfg: ConfigDir) -> None:
    write(cfg, "alpha", 'memory = { max = "64MiB" }\ncpu = { max = 5 }\npids = 10')
    before = loaded(cfg)
    write(cfg, "alpha", 'memory = { max = "32MiB" }\ncpu = { max = 5 }\npids = 12')
    d = reload_diff(cfg, before)
    assert d.replaced == {} and d.scaled == {} and d.create == [] and d.destroy == []
    assert [r.path for r in d.resized] == ["tenants/alpha"]
    assert d.resized[0].changes() == {"memory.max": [64 * MiB, 32 * MiB], "pids": [10, 12]}
    assert d.unchanged == []


@pytest.mark.parametrize(
    ("worker", "changed"),
    [
        ('env = { A = "1" }', True),
        ('cwd = "/tmp"', True),
        ('stop_signal = "INT"', True),
        ("stop_timeout = 1", True),
        ("instances = 3", False),
    ],
)
def test_a_changed_definition_replaces_the_worker_but_instances_only_scale(
    cfg: ConfigDir, worker: str, changed: bool
) -> None:
    write(cfg, "alpha")
    before = loaded(cfg)
    write(cfg, "alpha", worker=worker)
    d = reload_diff(cfg, before)
    if changed:
        assert d.replaced == {"alpha": ["w"]} and d.scaled == {}
        assert d.restarted_names() == ["alpha:w"]
    else:
        assert d.replaced == {} and d.scaled == {"alpha": {"w": (1, 3)}}
    assert d.unchanged == []


def test_a_changed_command_replaces_only_that_worker(cfg: ConfigDir) -> None:
    two = '[[worker]]\nname = "v"\ncommand = ["sleep", "2"]\n'
    write(cfg, "alpha", worker=two)
    write(cfg, "beta")
    before = loaded(cfg)
    write(cfg, "alpha", worker=two.replace('"2"', '"3"'))
    d = reload_diff(cfg, before)
    assert d.replaced == {"alpha": ["v"]}
    assert d.unchanged == ["beta"]


def test_restart_policy_or_flags_replace_every_worker_of_the_tenant(cfg: ConfigDir) -> None:
    two = '[[worker]]\nname = "v"\ncommand = ["sleep", "2"]\n'
    write(cfg, "alpha", worker=two)
    before = loaded(cfg)
    write(cfg, "alpha", 'restart = { policy = "always" }', worker=two)
    assert reload_diff(cfg, before).replaced == {"alpha": ["w", "v"]}
    write(cfg, "alpha", 'flags = ["memory-isolation"]', worker=two)
    d = reload_diff(cfg, before)
    assert d.replaced == {"alpha": ["w", "v"]}
    assert d.resized[0].changes() == {"flags": [[], ["memory-isolation"]]}


def test_workers_added_to_or_removed_from_a_kept_tenant_scale_from_or_to_zero(
    cfg: ConfigDir,
) -> None:
    write(cfg, "alpha", worker='[[worker]]\nname = "v"\ncommand = ["true"]\n')
    before = loaded(cfg)
    write(cfg, "alpha", worker='[[worker]]\nname = "u"\ncommand = ["true"]\ninstances = 2\n')
    assert reload_diff(cfg, before).scaled == {"alpha": {"u": (0, 2), "v": (1, 0)}}


def test_autostart_alone_changes_nothing_that_runs(cfg: ConfigDir) -> None:
    write(cfg, "alpha")
    before = loaded(cfg)
    write(cfg, "alpha", "autostart = false")
    d = reload_diff(cfg, before)
    assert d.empty and d.unchanged == ["alpha"]


def test_added_removed_and_moved_tenants_with_their_partitions(cfg: ConfigDir) -> None:
    cfg.partitions += '\n[[partition]]\nname = "other"\nflags = ["hierarchical"]\n'
    write(cfg, "alpha")
    write(cfg, "beta")
    write(cfg, "mover")
    before = loaded(cfg)
    (cfg.root / "tenants.d" / "beta.toml").unlink()
    write(cfg, "gamma")
    write(cfg, "mover", 'parent = "other"')
    d = reload_diff(cfg, before)
    assert d.added == ["gamma", "mover"]
    assert d.removed == ["beta", "mover"]
    assert d.create == ["other/mover", "tenants/gamma"]
    assert d.destroy == ["tenants/beta", "tenants/mover"]
    assert d.unchanged == ["alpha"]


def test_a_removed_group_goes_with_its_tenants_deepest_first(cfg: ConfigDir) -> None:
    cfg.partitions += '\n[[partition]]\nname = "other"\nflags = ["hierarchical"]\n'
    write(cfg, "alpha", 'parent = "other"')
    before = loaded(cfg)
    cfg.partitions = cfg.partitions.split('\n[[partition]]\nname = "other"')[0]
    (cfg.root / "tenants.d" / "alpha.toml").unlink()
    write(cfg, "beta")
    d = reload_diff(cfg, before)
    assert d.destroy == ["other/alpha", "other"]
    assert d.removed == ["alpha"] and d.added == ["beta"]


def test_the_diff_is_against_the_live_tree_so_overrides_are_undone(cfg: ConfigDir) -> None:
    write(cfg, "alpha", 'memory = { max = "64MiB" }')
    before = loaded(cfg)
    live = copy_tree(before.tree)
    live["tenants/alpha"].memory_max = 48 * MiB  # what `set` left
    after = loaded(cfg)
    d = diff(before, live, after, after.tree)
    assert d.resized[0].changes() == {"memory.max": [48 * MiB, 64 * MiB]}


def test_daemon_settings_a_reload_cannot_apply_are_listed_and_kept(cfg: ConfigDir) -> None:
    write(cfg, "alpha")
    before = loaded(cfg)
    cfg.write(backend="cgroup1", log_level="debug", tenants="tenants.d/a*.toml")
    after = load(cfg.path)
    notes = not_applied(before.daemon, after.daemon)
    assert [n.split(":")[0] for n in notes] == ["daemon.backend", "daemon.log_level"]
    assert "takes effect at the next daemon start" in notes[0]
    kept = keep_start_settings(before.daemon, after.daemon)
    assert kept.backend == "portable" and kept.log_level == before.daemon.log_level
    assert kept.tenants == "tenants.d/a*.toml"  # what is read and admitted applies at once


# --------------------------------------------------------------------------- resize order


def tree_of(*nodes: tuple[str, Limits]) -> PartitionTree:
    t = PartitionTree()
    for path, limits in nodes:
        node = Partition(path, flags=frozenset({"hierarchical"}))
        limits.apply(node)
        t.add(node, path.rpartition("/")[0])
    return t


def test_resize_steps_tighten_children_first_and_raise_parents_first() -> None:
    old_p, new_p = Limits(cpu_max=50.0, memory_max=100), Limits(cpu_max=80.0, memory_max=50)
    old_c, new_c = Limits(cpu_max=40.0, memory_max=100), Limits(cpu_max=70.0, memory_max=40)
    tree = tree_of(("p", new_p), ("p/c", new_c))
    steps = resize_steps([Resize("p", old_p, new_p), Resize("p/c", old_c, new_c)], tree)
    assert [(s.path, s.limits.cpu_max, s.limits.memory_max) for s in steps] == [
        ("p/c", 40.0, 40),  # memory lowered (child first), cpu kept at the lower old figure
        ("p", 50.0, 50),
        ("p", 80.0, 50),  # then cpu raised, parent first
        ("p/c", 70.0, 40),
    ]


def test_a_pure_raise_or_a_pure_lower_is_one_step_per_partition() -> None:
    a, b = Limits(pids_max=10), Limits(pids_max=20)
    tree = tree_of(("p", b))
    assert [s.limits for s in resize_steps([Resize("p", a, b)], tree)] == [b]
    assert [s.limits for s in resize_steps([Resize("p", b, a)], tree_of(("p", a)))] == [a]


def test_tightest_treats_none_as_unbounded_and_stays_consistent() -> None:
    old = Limits(memory_min=8, memory_max=100, memory_reserved=50, cpu_budget=10.0)
    new = Limits(memory_min=40, memory_max=None, memory_reserved=10, cpu_max=30.0)
    t = old.tightest(new)
    assert t == Limits(memory_min=8, memory_max=100, memory_reserved=10, cpu_budget=10.0,
                       cpu_max=30.0)  # fmt: skip
    assert t.memory_min + t.memory_reserved <= (t.memory_max or 0)


# --------------------------------------------------------------------------- limits, overrides


def test_copy_tree_is_independent_of_the_original() -> None:
    tree = tree_of(("p", Limits(memory_max=100)), ("p/c", Limits(memory_max=50)))
    copy = copy_tree(tree)
    copy["p/c"].memory_max = 10
    assert tree["p/c"].memory_max == 50
    assert copy["p/c"].parent is copy["p"] and copy["p"].children["c"] is copy["p/c"]
    assert [n.path for n in copy] == ["p", "p/c"]


def test_parse_set_reads_sizes_percentages_and_none() -> None:
    got = parse_set({"max": "64MiB", "reserved": 1024}, {"budget": 5, "max": None}, 50)
    assert got == {
        "memory_max": 64 * MiB,
        "memory_reserved": 1024,
        "cpu_budget": 5.0,
        "cpu_max": None,
        "pids_max": 50,
    }
    assert parse_set({"max": None}, None, None) == {"memory_max": None}


@pytest.mark.parametrize(
    ("memory", "cpu", "pids", "message"),
    [
        (None, None, None, "nothing to set"),
        ({"max": "lots"}, None, None, "memory.max"),
        ({"top": 1}, None, None, "unknown key"),
        (None, {"budget": 0}, None, "cpu.budget"),
        (None, {"max": 101}, None, "cpu.max"),
        (None, None, 0, "pids"),
        ("64MiB", None, None, "memory must be a map"),
    ],
)
def test_parse_set_refuses_what_it_cannot_read(
    memory: object, cpu: object, pids: object, message: str
) -> None:
    with pytest.raises(BadLimits, match=message):
        parse_set(memory, cpu, pids)  # type: ignore[arg-type]


def test_overrides_merge_and_round_trip_through_plain_data() -> None:
    o = Overrides()
    o.record("tenants/a", {"memory_max": 64 * MiB})
    o.record("tenants/a", {"pids_max": 5})
    o.record("tenants/b", {"cpu_max": None})
    assert o.to_dict() == {
        "tenants/a": {"memory.max": 64 * MiB, "pids": 5},
        "tenants/b": {"cpu.max": None},
    }
    again = Overrides.from_dict(o.to_dict())
    assert again.to_dict() == o.to_dict() and "tenants/a" in again
    assert again.clear() == ["tenants/a", "tenants/b"] and not again
    with pytest.raises(ValueError, match="unknown figure"):
        Overrides.from_dict({"x": {"memory.top": 1}})


def test_written_config_files_are_where_the_test_put_them(cfg: ConfigDir) -> None:
    # Guards the helpers above: a tenant file is read from tenants.d.
    write(cfg, "alpha")
    assert loaded(cfg).tenant_files["alpha"] == Path(cfg.root / "tenants.d" / "alpha.toml")
