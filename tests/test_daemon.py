"""The real daemon, in-process under trio, on the portable backend: real worker processes,
a real control socket, real signals. Assertions are on what a user sees over the socket
and in /proc."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import msgpack
import pytest
import trio

from supervisord_qnx.control.rpc import ErrorCode, RpcError
from tests.conftest import ConfigDir, pid_alive, worker_py

pytestmark = pytest.mark.integration

BEAT = worker_py(
    "import time, os\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1; print('beat', n, os.getpid(), flush=True); time.sleep(0.1)\n"
)


def two_tenants(cfg: ConfigDir, restart: str = "policy = 'always', backoff_initial = 0.05") -> None:
    for name in ("alpha", "bravo"):
        cfg.tenant(
            name,
            f"""
            memory = {{ max = "256MiB" }}
            restart = {{ {restart} }}
            [[worker]]
            name = "beat"
            command = {BEAT}
            """,
        )


async def test_every_worker_running_in_its_partition(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    status = await d.call("status")
    assert {(w["name"], w["state"], w["partition"]) for w in status} == {
        ("alpha:beat-0", "running", "tenants/alpha"),
        ("bravo:beat-0", "running", "tenants/bravo"),
    }
    for w in status:
        assert pid_alive(w["pid"])
        # The process carries its partition tag from its first instruction on. (While
        # the exec shim is in the middle of execve, /proc/PID/environ reads empty: wait
        # for the process to have an environment at all, then require the tag in it.)
        environ = Path(f"/proc/{w['pid']}/environ")
        with trio.fail_after(10):
            while not (raw := environ.read_bytes()):
                await trio.sleep(0.01)
        assert f"SUPERVISORD_QNX_LEAF={w['partition']}:beat-0".encode() in raw.split(b"\0")
    assert await d.call("ping") == "pong"
    assert (await d.call("version"))["backend"] == "portable"


async def test_sigkill_worker_comes_back_with_new_pid(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    before = await d.worker("alpha:beat-0")
    sibling = await d.worker("bravo:beat-0")
    os.kill(before["pid"], signal.SIGKILL)
    after = await d.wait_for(
        "alpha:beat-0", lambda w: w["state"] == "running" and w["pid"] != before["pid"]
    )
    assert after["restarts"] == 1
    assert after["exit_reason"] == "signal:SIGKILL"
    assert not pid_alive(before["pid"])  # reaped, not a zombie
    assert (await d.worker("bravo:beat-0"))["pid"] == sibling["pid"]


CRASH_POLICY = (
    'policy = "on-failure", backoff_initial = 0.01, backoff_max = 0.05, '
    "max_restarts = 3, window = 60"
)


async def test_crash_loop_becomes_fatal_after_max_restarts(cfg: ConfigDir, start_daemon) -> None:
    cfg.tenant(
        "crashy",
        f"""
        restart = {{ {CRASH_POLICY} }}
        [[worker]]
        name = "fail"
        command = {worker_py("import sys; print('failing'); sys.exit(1)")}
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("crashy:fail-0", lambda w: w["state"] == "fatal")
    assert w["restarts"] == 3
    assert w["exit_reason"] == "exit:1"
    fatal = await d.call("events", kind="fatal")
    assert fatal and fatal[-1]["worker"] == "crashy:fail-0"
    logs = await d.call("logs", tenant="crashy", lines=100)
    # Four runs (first + 3 restarts), every line appended to the same file.
    assert logs[0]["lines"].count("failing") == 4


async def test_clean_exit_is_final_under_on_failure(cfg: ConfigDir, start_daemon) -> None:
    cfg.tenant(
        "oneshot",
        f"""
        restart = {{ policy = "on-failure" }}
        [[worker]]
        name = "job"
        command = {worker_py("print('done')")}
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("oneshot:job-0", lambda w: w["state"] == "exited")
    assert w["exit_reason"] == "exit:0" and w["restarts"] == 0


async def test_memory_hog_killed_at_max_sibling_untouched(cfg: ConfigDir, start_daemon) -> None:
    hog = worker_py(
        "import time\n"
        "chunks = []\n"
        "while True:\n"
        "    chunks.append(bytearray(8 << 20)); time.sleep(0.05)\n"
    )
    cfg.tenant(
        "hog",
        f"""
        memory = {{ max = "96MiB", reserved = "16MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "grow"
        command = {hog}
        """,
    )
    cfg.tenant(
        "calm",
        f"""
        memory = {{ max = "96MiB" }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    d = await start_daemon()
    calm = await d.worker("calm:beat-0")
    w = await d.wait_for("hog:grow-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "memory-limit"
    kinds = [e["kind"] for e in await d.call("events", limit=1000)]
    assert "memory-pressure" in kinds and "memory-limit" in kinds
    after = await d.worker("calm:beat-0")
    assert after["pid"] == calm["pid"] and after["state"] == "running"


async def test_stop_escalates_to_sigkill_after_timeout(cfg: ConfigDir, start_daemon) -> None:
    stubborn = worker_py(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    cfg.tenant(
        "stubborn",
        f"""
        [[worker]]
        name = "w"
        command = {stubborn}
        stop_timeout = 0.3
        """,
    )
    d = await start_daemon()
    pid = (await d.worker("stubborn:w-0"))["pid"]
    # Until it says so, its SIGTERM handler may not be installed yet (a fixed sleep is
    # too short on a loaded machine, behind the exec wrappers of an unprivileged start).
    log = cfg.worker_log("stubborn", "w-0")
    with trio.fail_after(30):
        while not (log.exists() and "ready" in log.read_text()):
            await trio.sleep(0.02)
    result = await d.call("stop", tenant="stubborn")
    assert result[0]["state"] == "stopped"
    assert result[0]["exit_reason"] == "stopped (signal:SIGKILL)"
    assert not pid_alive(pid)


async def test_lifecycle_commands_and_errors(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    with pytest.raises(RpcError) as exc:
        await d.call("start", tenant="nope")
    assert exc.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(RpcError) as exc:
        await d.call("start", tenant=5)
    assert exc.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(RpcError) as exc:
        await d.call("start", tenant="alpha", wiat=True)
    assert exc.value.code == ErrorCode.BAD_REQUEST and "wiat" in exc.value.message
    with pytest.raises(RpcError) as exc:
        await d.call("frobnicate")
    assert exc.value.code == ErrorCode.UNKNOWN_METHOD

    first = await d.call("stop", tenant="alpha")
    assert first[0]["state"] == "stopped"
    again = await d.call("stop", tenant="alpha")  # idempotent
    assert again[0]["state"] == "stopped"
    started = await d.call("start", tenant="alpha", wait=True)
    assert started[0]["state"] == "running"
    old_pid = started[0]["pid"]
    restarted = await d.call("restart", tenant="alpha", wait=True)
    assert restarted[0]["state"] == "running" and restarted[0]["pid"] != old_pid
    # The other tenant was never touched.
    assert (await d.worker("bravo:beat-0"))["restarts"] == 0


async def test_logs_are_appended_across_restarts(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    pid1 = (await d.worker("alpha:beat-0"))["pid"]
    await trio.sleep(0.3)
    await d.call("restart", tenant="alpha", wait=True)
    pid2 = (await d.worker("alpha:beat-0"))["pid"]
    await trio.sleep(0.3)
    text = cfg.worker_log("alpha", "beat-0").read_text()
    assert f" {pid1}\n" in text and f" {pid2}\n" in text
    tail = await d.call("logs", tenant="alpha", worker="beat", lines=2)
    assert len(tail[0]["lines"]) == 2 and tail[0]["lines"][-1].startswith("beat ")


async def test_partitions_report_live_usage(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    await trio.sleep(0.2)
    report = await d.call("partitions")
    assert report["backend"] == "portable"
    tenants = report["tree"]["children"][0]
    assert tenants["path"] == "tenants"
    alpha = next(c for c in tenants["children"] if c["name"] == "alpha")
    assert alpha["limits"]["memory"]["max"] == 256 << 20
    pid = (await d.worker("alpha:beat-0"))["pid"]
    assert pid in alpha["usage"]["pids"]
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # The figure is the worker's real resident size (sampled a moment apart).
    assert 0.5 * rss <= alpha["usage"]["memory_current"] <= 2 * rss


async def test_partitions_of_one_subtree(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    await trio.sleep(0.2)
    whole = await d.call("partitions")
    alpha = await d.call("partitions", partition="tenants/alpha")
    # The subtree is the same node as in the whole tree, figures read for it alone.
    tree = alpha["tree"]
    assert (tree["path"], tree["name"], tree["tenant"]) == ("tenants/alpha", "alpha", "alpha")
    in_whole = next(c for c in whole["tree"]["children"][0]["children"] if c["name"] == "alpha")
    assert tree["limits"] == in_whole["limits"]
    assert [c["path"] for c in tree["children"]] == [c["path"] for c in in_whole["children"]]
    pid = (await d.worker("alpha:beat-0"))["pid"]
    assert pid in tree["usage"]["pids"]
    assert alpha["backend"] == whole["backend"]
    top = await d.call("partitions", partition="tenants")
    assert {c["name"] for c in top["tree"]["children"]} == {"alpha", "bravo"}
    assert len(msgpack.packb(alpha)) < len(msgpack.packb(whole)) / 2
    for bad, code in (("tenants/nope", ErrorCode.NOT_FOUND), ("", ErrorCode.NOT_FOUND),
                      (7, ErrorCode.BAD_REQUEST)):  # fmt: skip
        with pytest.raises(RpcError) as exc:
            await d.call("partitions", partition=bad)
        assert exc.value.code == code
    assert (await d.call("ping")) == "pong"


async def test_attach_and_detach_a_running_process(cfg: ConfigDir, start_daemon) -> None:
    two_tenants(cfg)
    d = await start_daemon()
    proc = await trio.lowlevel.open_process(["sleep", "30"])
    try:
        await d.call("attach", partition="tenants/alpha", pid=proc.pid)
        report = await d.call("partitions")
        alpha = next(c for c in report["tree"]["children"][0]["children"] if c["name"] == "alpha")
        assert proc.pid in alpha["usage"]["pids"]
        await d.call("detach", pid=proc.pid)
        with pytest.raises(RpcError) as exc:
            await d.call("attach", partition="tenants/nope", pid=proc.pid)
        assert exc.value.code == ErrorCode.NOT_FOUND
    finally:
        proc.kill()
        await proc.wait()


async def test_shutdown_stops_every_tenant(cfg: ConfigDir, start_daemon) -> None:
    # Independent tenants stop at the same time, in no order; `after` orders them
    # (tests/test_daemon_ordering.py).
    two_tenants(cfg)
    d = await start_daemon()
    await d.call("restart", tenant="alpha", wait=True)
    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(20):
        await d.daemon.stopped.wait()
    stops = [
        e["worker"]
        for e in d.daemon.events.history
        if e["kind"] == "state" and e["new"] == "stopped"
    ]
    assert sorted(stops[-2:]) == ["alpha:beat-0", "bravo:beat-0"]
    assert not os.path.exists(cfg.socket)


async def test_missing_program_is_spawn_failed_not_a_restart_loop(
    cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "ghost",
        """
        memory = { max = "64MiB" }
        restart = { policy = "always", backoff_initial = 0.01 }
        [[worker]]
        name = "w"
        command = ["/nonexistent/program", "--flag"]
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("ghost:w-0", lambda w: w["state"] == "fatal")
    assert w["exit_reason"] == "spawn-failed: no such program: /nonexistent/program"
    assert w["restarts"] == 0


async def test_portable_rlimits_are_in_force_before_the_program_runs(
    cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant(
        "limited",
        """
        flags = ["memory-isolation"]
        memory = { max = "96MiB" }
        restart = { policy = "never" }
        [[worker]]
        name = "cat"
        command = ["cat", "/proc/self/limits"]
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("limited:cat-0", lambda w: w["state"] == "exited")
    assert w["exit_reason"] == "exit:0"
    limits = cfg.worker_log("limited", "cat-0").read_text()
    data = next(line for line in limits.splitlines() if line.startswith("Max data size"))
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert data.split()[3:5] == [str(2 * 96 << 20)] * 2  # soft and hard: 2 x max
    assert core.split()[4:6] == ["0", "0"]
