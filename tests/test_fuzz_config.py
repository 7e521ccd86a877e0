"""Hypothesis against the config loader: random daemon files and random tenant trees,
written to disk as TOML (with the keys the models know, wrong types, extreme figures,
broken syntax, directories and dangling links where files should be), then loaded in
process (``load`` and the backend's ``admit``, as ``--check`` does) and by
``supervisord-qnx --check`` itself. The only outcomes allowed are a valid config or
problems each located as ``file: key: reason`` in one of the files written; never a
traceback.

To extend: add keys to ``TENANT_KEYS``/``DAEMON_KEYS`` (new config keys) or values to
``leaf``; ``check_outcome`` judges any config directory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.daemon import admit, make_backend

DAEMON = str(Path(sys.executable).parent / "supervisord-qnx")

# -- TOML text: a small writer of our own (inline tables only), so that any value tree
# hypothesis builds, nested however deep, is one valid document.


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_str(v: str) -> str:
    # JSON's escapes are TOML basic-string escapes, but not its surrogate pairs (so
    # non-ASCII goes in as is) and it leaves DEL raw, which TOML wants escaped.
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in doc.items())


# -- values and keys

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
leaf = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([0, 1, -1, 64, 4096, 2**31, 2**62])
    | st.floats()
    | text
    | st.sampled_from(
        [
            *("64MiB", "1KiB", "0", "-5MiB", "1e3", "9999999PiB", "TERM", "SIGKILL", "nobody"),
            *("always", "never", "notify", "on-failure", "a/b", "tenants", "", "..", "x.wat"),
            *("hierarchical", "memory-isolation", "container", "/", "@w-0", "memory.max"),
        ]
    )
)
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)


def named(p: dict[str, Any]) -> dict[str, Any]:
    return {"name": "a", **p}


def partitions(doc: dict[str, Any]) -> list[Any]:
    p = doc.get("partition", [])
    return p if isinstance(p, list) else [p]


# Plausible values first (so that many configs get past the models into the partition
# tree's admission rules and the wasm checks), any value now and then.
def mostly(*plausible: Any) -> st.SearchStrategy[Any]:
    return sometimes(leaf, st.sampled_from(plausible))


def sometimes(odd: st.SearchStrategy[Any], usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` three times in four. (Not ``usual | odd``: hypothesis flattens a one_of,
    so ``odd``'s many branches would each weigh as much as ``usual``.)"""
    return st.integers(0, 3).flatmap(lambda i: odd if i == 0 else usual)


size = mostly("8MiB", "32MiB", "64MiB", "1GiB", 0, 4096, "16MiB")
percent = mostly(5, 10, 25.5, 50, 100, 0.001)
count = mostly(1, 2, 16, 64)
seconds = mostly(0.1, 1, 5, 60)
MEMORY = st.dictionaries(st.sampled_from(["min", "max", "reserved", "max", "high"]), size,
                         max_size=3)  # fmt: skip
CPU = st.dictionaries(st.sampled_from(["budget", "max", "max", "weight"]), percent, max_size=2)
RESTART = st.fixed_dictionaries(
    {},
    optional={
        "policy": mostly("always", "on-failure", "never"),
        "backoff_initial": seconds,
        "backoff_max": seconds,
        "max_restarts": count,
        "window": seconds,
    },
)
LOG = st.fixed_dictionaries({}, optional={"max_size": size, "keep": count})
WORKER_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "name": mostly("w", "v", "w.x", "w-0") | text,
    "command": st.just(["true"]) | st.lists(text, max_size=3) | leaf,
    "wasm": mostly("mod.wat", "missing.wasm", "bad.wasm", "x.txt"),
    "instances": count,
    "stop_signal": mostly("TERM", "SIGKILL", 9, "HUP", 65),
    "stop_timeout": seconds,
    "ready": mostly("started", "notify"),
    "watchdog": seconds,
    "start_timeout": seconds,
    "cwd": mostly(".", "..", "/nonexistent", "sub"),
    "env": st.dictionaries(text, mostly("1", "x"), max_size=2),
    "args": st.lists(text, max_size=2) | leaf,
    "preopen": st.dictionaries(text, mostly(".", "/tmp"), max_size=2),
    "limits": st.fixed_dictionaries(
        {}, optional={"memory": size, "fuel": count, "timeout": seconds, "tables": count}
    ),
    "log": sometimes(leaf, LOG),
}
PARTITION_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "name": mostly("a", "b", "tenants", "tenants.x") | text,
    "parent": mostly("", "tenants", "a", "a/b", "/tenants/", "missing", "../x"),
    "flags": st.lists(mostly("hierarchical", "memory-isolation", "container", "nope"), max_size=2),
    "memory": sometimes(leaf, MEMORY),
    "cpu": sometimes(leaf, CPU),
    "pids": count,
}
TENANT_KEYS: dict[str, st.SearchStrategy[Any]] = {
    **PARTITION_KEYS,
    "name": mostly("t1", "t2", "a.b", "x y", ""),
    "parent": mostly("tenants", "a", "", "tenants/t1", "missing"),
    "autostart": mostly(True, False),
    "after": st.lists(mostly("t1", "t2", "t3", "missing"), max_size=3),
    "restart": sometimes(leaf, RESTART),
    "log": sometimes(leaf, LOG),
}
DAEMON_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "socket": mostly("run/c.sock", "", "/"),
    "socket_mode": mostly(0o600, 0o660, 0o1777),
    "state_dir": mostly("state", ""),
    "log_dir": mostly("log", "/"),
    "backend": mostly("auto", "portable", "cgroup1", "qnx", "nope"),
    "enforcement": mostly("strict", "best-effort"),
    # Never a pattern reaching outside the test's directory: the loader globs it.
    "tenants": st.sampled_from(["tenants.d/*.toml", "tenants.d/*", "*.toml", "none/*.toml"]),
    "log_format": mostly("console", "json"),
    "log_level": mostly("debug", "info"),
    "cgroup_root": mostly("sqnx-fuzz", "a/b", ""),
    "sample_interval": seconds,
    "max_message_bytes": mostly(1024, 1 << 20, 100),
    "subscriber_queue": count,
    "wasm_prefork": mostly(True, False),
    "metrics_interval": seconds,
    "log": sometimes(leaf, LOG),
}


def table(
    keys: dict[str, st.SearchStrategy[Any]], most: int | None = None
) -> st.SearchStrategy[dict[str, Any]]:
    """A table of some of ``keys`` (each with its own strategy) and now and then an
    unknown key."""
    most = len(keys) if most is None else most
    known = st.lists(st.sampled_from(sorted(keys)), unique=True, max_size=most).flatmap(
        lambda ks: st.fixed_dictionaries({k: keys[k] for k in ks})
    )
    unknown = st.dictionaries(text, values, min_size=1, max_size=1)
    return st.tuples(known, st.sampled_from([0] * 7 + [1]), unknown).map(
        lambda t: {**t[2], **t[0]} if t[1] else t[0]
    )


# Each worker table starts from a valid one; the keys drawn then change it.
workers = (
    st.lists(table(WORKER_KEYS).map(lambda w: {"name": "w", "command": ["true"], **w}), max_size=3)
    | st.lists(table(WORKER_KEYS), max_size=2)
    | leaf
)
tenant_docs = st.tuples(table(TENANT_KEYS), workers).map(lambda t: {**t[0], "worker": t[1]})
daemon_docs = st.fixed_dictionaries(
    {},
    optional={
        "daemon": sometimes(leaf | table(DAEMON_KEYS), table(DAEMON_KEYS, 3)),
        "partition": sometimes(leaf, st.lists(table(PARTITION_KEYS, 2).map(named), max_size=2)),
    },
).map(
    lambda d: {**d, "partition": [{"name": "tenants", "flags": ["hierarchical"]}, *partitions(d)]}
)
# A file's content: a generated document most of the time, else text that is rarely TOML.
file_body = st.one_of(
    tenant_docs.map(toml_doc),
    tenant_docs.map(toml_doc),
    st.text(max_size=80),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
# What sits where a tenant file should: a file (text, or bytes that need not be UTF-8), a
# directory, or a dangling symlink.
entry = st.one_of(
    file_body.map(lambda b: ("file", b)),
    st.binary(max_size=40).map(lambda b: ("bytes", b.hex())),
    st.sampled_from([("dir", ""), ("link", "")]),
)
wild_trees = st.dictionaries(
    st.sampled_from(["t1", "t2", "t3", "a.b", "bad name", "x"]), entry, max_size=4
)
# Valid tenant files with one or two keys changed: most load, so the partition tree's
# admission rules, ordering and the wasm checks see many configs.
near_workers = st.lists(
    table(WORKER_KEYS, 1).map(lambda w: {"name": "w", "command": ["true"], **w}),
    min_size=1,
    max_size=1,
)
near_valid = st.tuples(table(TENANT_KEYS, 2), near_workers).map(
    lambda t: ("file", toml_doc({**t[0], "worker": t[1]}))
)
near_trees = st.dictionaries(st.sampled_from(["t1", "t2", "t3"]), near_valid, max_size=3)
tenant_trees = wild_trees | near_trees
WAT = '(module (func (export "_start")))'


def write_tree(root: Path, daemon: dict[str, Any], tenants: dict[str, tuple[str, str]]) -> Path:
    root.mkdir(parents=True)
    tdir = root / "tenants.d"
    tdir.mkdir()
    (tdir / "mod.wat").write_text(WAT)
    (tdir / "bad.wasm").write_bytes(b"\0asm\x01\0\0\0\xff")
    for name, (kind, body) in tenants.items():
        path = tdir / f"{name}.toml"
        if kind == "file":
            path.write_text(body)
        elif kind == "bytes":
            path.write_bytes(bytes.fromhex(body))
        elif kind == "dir":
            path.mkdir()
        else:
            path.symlink_to(root / "nowhere")
    config = root / "daemon.toml"
    config.write_text(toml_doc(daemon))
    return config


def check_outcome(config: Path) -> str:
    """Load as ``--check`` does (portable backend, whatever the file asks for); return
    "valid" or "problems", or fail on anything else."""
    files = {str(p) for p in config.parent.rglob("*")}
    try:
        loaded = load(config)
        admit(loaded, make_backend(loaded, "portable"))
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.file in files, p
            assert p.reason.strip(), p
        return "problems"
    return "valid"


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


@pytest.mark.timeout(120)
def test_random_configs_load_or_are_located(tmp_path: Path) -> None:
    outcomes: list[str] = []
    n = iter(range(10**9))

    @fuzz_settings(400)
    @given(daemon_docs, tenant_trees)
    def one(daemon: dict[str, Any], tenants: dict[str, tuple[str, str]]) -> None:
        outcomes.append(check_outcome(write_tree(tmp_path / str(next(n)), daemon, tenants)))

    one()
    # Both outcomes were reached: the generator is not stuck on one side of validation.
    assert set(outcomes) == {"valid", "problems"}, outcomes.count("valid")


@pytest.mark.timeout(120)
def test_check_cli_on_random_configs(tmp_path: Path) -> None:
    """The same at the real command: exit 0 or 2, and stderr free of tracebacks."""
    n = iter(range(10**9))

    @fuzz_settings(12)
    @given(daemon_docs, tenant_trees)
    def one(daemon: dict[str, Any], tenants: dict[str, tuple[str, str]]) -> None:
        config = write_tree(tmp_path / str(next(n)), daemon, tenants)
        expected = check_outcome(config)
        res = subprocess.run(
            [DAEMON, "--check", "--backend", "portable", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode == {"valid": 0, "problems": 2}[expected], res.stderr
        out = json.loads(res.stdout)
        if expected == "problems":
            assert out["ok"] is False and all(p["reason"] for p in out["problems"])
        else:
            assert out["ok"] is True

    one()


def test_a_tenant_file_that_is_not_utf8_is_a_located_problem(tmp_path: Path) -> None:
    """Found by the test above: a binary file matched by the tenants pattern (a wasm
    module beside the tenant files, a file in another encoding) ended ``--check`` and
    ``reload`` with a UnicodeDecodeError traceback."""
    config = write_tree(tmp_path / "c", {}, {"t1": ("bytes", b'name = "\xff"\n'.hex())})
    with pytest.raises(ConfigError) as caught:
        load(config)
    (problem,) = caught.value.problems
    assert problem.file == str(config.parent / "tenants.d" / "t1.toml")
    assert "UTF-8" in problem.reason
