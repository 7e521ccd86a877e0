"""The ``metrics`` method and the textfile, through the real daemon: the exposition is
parsed by prometheus_client's own parser (as Prometheus would read it) and its figures
are compared with what ``status`` and ``partitions`` say at the same moment."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from supervisord_qnx.control.rpc import ErrorCode, RpcError
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, wait_until, worker_py
from tests.daemonproc import DaemonProc, ctl

pytestmark = pytest.mark.integration

MiB = 1 << 20

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample by (name, labels)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def find_partition(report: dict[str, Any], path: str) -> dict[str, Any]:
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == path:
            return dict(node)
        stack.extend(node["children"])
    raise KeyError(path)


CRASH = (
    'policy = "on-failure", backoff_initial = 0.01, backoff_max = 0.02, '
    "max_restarts = 2, window = 60"
)


def tenants(cfg: ConfigDir) -> None:
    # One steady worker (one process: its partition's figures hold still between the
    # calls compared) and one that crashes until fatal (a known restart count).
    cfg.tenant(
        "steady",
        """
        memory = { max = "64MiB" }
        pids = 16
        [[worker]]
        name = "sleep"
        command = ["sleep", "1000"]
        """,
    )
    cfg.tenant(
        "crashy",
        f"""
        restart = {{ {CRASH} }}
        [[worker]]
        name = "fail"
        command = {worker_py("import sys; sys.exit(3)")}
        """,
    )


async def settled(d: Any) -> list[dict[str, Any]]:
    await d.wait_for("steady:sleep-0", lambda w: w["state"] == "running")
    await d.wait_for("crashy:fail-0", lambda w: w["state"] == "fatal")
    return list(await d.call("status"))


async def check_against_status_and_partitions(d: Any, pids_enforced: bool) -> Samples:
    status = await settled(d)
    report = await d.call("partitions")
    types, samples = parse(await d.call("metrics"))

    assert types["supervisord_qnx_worker_state"] == "gauge"
    assert types["supervisord_qnx_worker_restarts"] == "counter"
    assert types["supervisord_qnx_control_request_duration_seconds"] == "histogram"
    states = series(samples, "supervisord_qnx_worker_state")
    for w in status:
        who = {"tenant": w["tenant"], "worker": w["worker"], "instance": str(w["instance"])}
        mine = {dict(k)["state"]: v for k, v in states.items() if dict(k).items() >= who.items()}
        # One-hot: every state listed, exactly one of them 1, and it is status' state.
        assert len(mine) == 7 and sum(mine.values()) == 1, mine
        assert mine[w["state"]] == 1
        assert value(samples, "supervisord_qnx_worker_restarts_total", **who) == w["restarts"]
        reason = w["exit_reason"]
        exits = {
            dict(k)["reason"]
            for k in series(samples, "supervisord_qnx_worker_last_exit_info")
            if dict(k).items() >= who.items()
        }
        assert exits == ({reason} if reason else set())
        uptime = value(samples, "supervisord_qnx_worker_uptime_seconds", **who)
        assert (uptime is not None) == (w["state"] == "running")
    crashy = next(w for w in status if w["tenant"] == "crashy")
    assert crashy["restarts"] == 2 and crashy["exit_reason"] == "exit:3"

    for path in ("tenants", "tenants/steady", "tenants/crashy"):
        usage = find_partition(report, path)["usage"]
        limits = find_partition(report, path)["limits"]
        p = {"partition": path}
        assert value(samples, "supervisord_qnx_partition_stats_readable", **p) == 1
        assert (
            value(samples, "supervisord_qnx_partition_memory_limit_bytes", **p)
            == usage["memory_limit"]
        )
        assert (
            value(samples, "supervisord_qnx_partition_pids_current", **p) == usage["pids_current"]
        )
        assert (
            value(samples, "supervisord_qnx_partition_oom_kills_total", **p) == usage["oom_kills"]
        )
        assert (
            value(samples, "supervisord_qnx_partition_memory_pressure_events_total", **p)
            == usage["memory_pressure_events"]
        )
        pids_limit = value(samples, "supervisord_qnx_partition_pids_limit", **p)
        assert pids_limit == (limits["pids"] if pids_enforced else None)
        cpu = value(samples, "supervisord_qnx_partition_cpu_usage_seconds_total", **p)
        assert cpu is not None and cpu >= 0
    steady = {"partition": "tenants/steady"}
    assert value(samples, "supervisord_qnx_partition_memory_limit_bytes", **steady) == 64 * MiB
    assert value(samples, "supervisord_qnx_partition_pids_current", **steady) == 1
    assert value(samples, "supervisord_qnx_partition_memory_current_bytes", **steady)
    # The daemon process itself, and adoption (not implemented yet: always 0).
    assert value(samples, "supervisord_qnx_process_resident_memory_bytes")
    assert value(samples, "supervisord_qnx_process_open_fds")
    assert value(samples, "supervisord_qnx_adopted_workers") == 0
    return samples


async def test_metrics_equal_status_and_partitions_portable(cfg: ConfigDir, start_daemon) -> None:
    tenants(cfg)
    d = await start_daemon()
    samples = await check_against_status_and_partitions(d, pids_enforced=False)
    # Portable enforces no pids limit and has no kernel OOM killer to count: left out.
    assert value(samples, "supervisord_qnx_partition_oom_kills_total", partition="tenants") is None


async def test_metrics_equal_status_and_partitions_cgroup1(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenants(cfg)
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    samples = await check_against_status_and_partitions(d, pids_enforced=True)
    assert value(samples, "supervisord_qnx_partition_pids_limit", partition="tenants/steady") == 16
    info = series(samples, "supervisord_qnx_build_info")
    assert [dict(k)["backend"] for k in info] == ["cgroup1"]


def requests(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(k)["method"], dict(k)["code"]): v
        for k, v in series(samples, "supervisord_qnx_control_requests_total").items()
    }


async def test_request_counters_count_answers_by_method_and_code(
    cfg: ConfigDir, start_daemon
) -> None:
    tenants(cfg)
    d = await start_daemon()
    await settled(d)
    _, before = parse(await d.call("metrics"))
    await d.call("status")
    await d.call("status", tenant="steady")
    for call, params, code in (
        ("status", {"tenant": "nobody"}, ErrorCode.NOT_FOUND),
        ("status", {"tenat": "steady"}, ErrorCode.BAD_REQUEST),
        ("no-such-method-1", {}, ErrorCode.UNKNOWN_METHOD),
        ("no-such-method-2", {}, ErrorCode.UNKNOWN_METHOD),
    ):
        with pytest.raises(RpcError) as err:
            await d.call(call, **params)
        assert err.value.code == code
    _, after = parse(await d.call("metrics"))
    old, new = requests(before), requests(after)
    grew = {k: new[k] - old.get(k, 0) for k in new if new[k] != old.get(k, 0)}
    # The first metrics call is counted once it answered; made-up names share one label.
    assert grew == {
        ("status", "ok"): 2,
        ("status", "not_found"): 1,
        ("status", "bad_request"): 1,
        ("unknown", "unknown_method"): 2,
        ("metrics", "ok"): 1,
    }
    answered = sum(n for (m, _), n in new.items() if m == "status")
    assert (
        value(after, "supervisord_qnx_control_request_duration_seconds_count", method="status")
        == answered
    )
    assert (
        value(
            after,
            "supervisord_qnx_control_request_duration_seconds_bucket",
            method="status",
            le="+Inf",
        )
        == answered
    )


async def test_textfile_is_replaced_whole_every_interval(cfg: ConfigDir, start_daemon) -> None:
    tenants(cfg)
    out = cfg.root / "textfile"
    out.mkdir()
    path = out / "supervisord_qnx.prom"
    d = await start_daemon(metrics_textfile=str(path), metrics_interval=0.1)
    await settled(d)

    # A reader as node_exporter is one: it opens the path and reads it whole, as often as
    # it can, while the daemon replaces it. Every read must be a complete exposition.
    reads: set[str] = set()  # many reads see the same file: parse each once
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(path) as f:
                    reads.add(f.read())
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        await trio.sleep(2.0)
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join)
    assert reads
    for text in reads:
        _, samples = parse(text)
        # The first family and the last one are both there: nothing half-written.
        assert value(samples, "supervisord_qnx_adopted_workers") == 0
        assert "# TYPE supervisord_qnx_control_request_duration_seconds histogram" in text
    assert len(reads) >= 2  # it was rewritten while being read
    # Replaced by rename, never rewritten in place: a reader holding the old file keeps
    # it whole, and that file is unlinked once a newer one took its name.
    with open(path) as held:
        first = held.read()
        with trio.fail_after(10):
            while os.fstat(held.fileno()).st_nlink:
                await trio.sleep(0.02)
        held.seek(0)
        assert held.read() == first
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # node_exporter may be another user
    assert sorted(p.name for p in out.iterdir()) == ["supervisord_qnx.prom"]  # no temp left
    _, samples = parse(path.read_text())
    assert (
        value(
            samples,
            "supervisord_qnx_worker_state",
            tenant="crashy",
            worker="fail",
            instance="0",
            state="fatal",
        )
        == 1
    )


def test_textfile_failure_is_logged_once_and_the_daemon_carries_on(cfg: ConfigDir) -> None:
    tenants(cfg)
    missing = cfg.root / "not-yet"
    cfg.write(metrics_textfile=str(missing / "supervisord_qnx.prom"), metrics_interval=0.1)
    d = DaemonProc(cfg)
    try:
        wait_until(lambda: "cannot write the metrics textfile" in d.output(), 15, "the error")
        time.sleep(1.0)  # ten more intervals, all failing
        out = d.output()
        assert out.count("cannot write the metrics textfile") == 1, out
        assert "No such file or directory" in out
        # The daemon is unharmed: it answers, its workers run, metrics still render.
        status = ctl(cfg.socket, "--json", "status", "steady", check=True)
        assert json.loads(status.stdout)[0]["state"] == "running"
        text = ctl(cfg.socket, "metrics", check=True).stdout
        _, samples = parse(text)
        assert value(samples, "supervisord_qnx_adopted_workers") == 0
        samples_json = json.loads(ctl(cfg.socket, "--json", "metrics", check=True).stdout)
        assert {
            "name": "supervisord_qnx_partition_memory_limit_bytes",
            "labels": {"partition": "tenants/steady"},
            "value": 64 * MiB,
            "type": "gauge",
        } in samples_json
        # The directory appears: the next interval writes, and says so once.
        missing.mkdir()
        wait_until((missing / "supervisord_qnx.prom").exists, 15, "the textfile")
        wait_until(lambda: "metrics textfile written again" in d.output(), 15, "recovery log")
        parse((missing / "supervisord_qnx.prom").read_text())
    finally:
        assert d.stop() == 0


def test_metrics_interval_is_validated(cfg: ConfigDir) -> None:
    from supervisord_qnx.config.load import ConfigError, load

    cfg.tenant("steady", "[[worker]]\nname = 'w'\ncommand = ['true']\n")
    cfg.write(metrics_textfile="m.prom", metrics_interval=0)
    with pytest.raises(ConfigError) as err:
        load(cfg.path)
    assert "metrics_interval" in str(err.value)
    cfg.write(metrics_textfile="m.prom")
    config = load(cfg.path)
    assert config.daemon.metrics_interval == 15.0
    assert config.daemon.metrics_textfile == Path(cfg.root / "m.prom")


async def test_unreadable_partition_is_flagged_and_the_rest_still_reported(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    tenants(cfg)
    cfg.tenant("idle", "autostart = false\n[[worker]]\nname = 'w'\ncommand = ['sleep', '1000']\n")
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    await settled(d)
    # Removed from outside (an administrator, a cleanup script): its figures cannot be read.
    cg.dir("memory", "tenants", "idle").rmdir()
    report = await d.call("partitions")
    assert "error" in find_partition(report, "tenants/idle")["usage"]
    _, samples = parse(await d.call("metrics"))
    idle = {"partition": "tenants/idle"}
    assert value(samples, "supervisord_qnx_partition_stats_readable", **idle) == 0
    assert value(samples, "supervisord_qnx_partition_memory_current_bytes", **idle) is None
    steady = {"partition": "tenants/steady"}
    assert value(samples, "supervisord_qnx_partition_stats_readable", **steady) == 1
    assert value(samples, "supervisord_qnx_partition_memory_limit_bytes", **steady) == 64 * MiB
