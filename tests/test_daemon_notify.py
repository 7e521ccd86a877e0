"""Readiness and watchdog for workers through the real daemon (in-process, portable
backend): real worker processes speaking the sd_notify datagram protocol to the
``NOTIFY_SOCKET`` the daemon gives them, as programs written for systemd's
``Type=notify`` do, and a real WebAssembly tenant doing it through the runner's import.

Workers are told when to speak through files the test creates (never by timing), and
every assertion is on what a user sees: ``status``, the ``events`` log, /proc.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.cgroup_helpers import CgroupRoot
from tests.conftest import REPO, ConfigDir, pid_alive, worker_py
from tests.daemonproc import CTL

pytestmark = pytest.mark.integration

# Sends one sd_notify datagram the way libsystemd does (sendmsg on a fresh socket).
SEND = (
    "import os, socket, sys, time\n"
    "def send(msg):\n"
    "    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "    s.sendmsg([msg.encode()], [], 0, os.environ['NOTIFY_SOCKET'])\n"
    "    s.close()\n"
    "def wait_for(path):\n"
    "    while not os.path.exists(path): time.sleep(0.02)\n"
)

NOTIFY_WAT = REPO / "config" / "wasm" / "notify.wat"


def notify_tenant(
    cfg: ConfigDir, name: str, code: str, worker_keys: str, restart: str, autostart: bool = True
) -> None:
    # A worker that waits for the test to say READY=1 is started by the test: the daemon's
    # start-up waits for its autostart workers to be ready.
    cfg.tenant(
        name,
        f"""
        autostart = {"true" if autostart else "false"}
        memory = {{ max = "256MiB" }}
        restart = {{ {restart} }}
        [[worker]]
        name = "w"
        command = {worker_py(SEND + code)}
        {worker_keys}
        """,
    )


def environ(pid: int) -> dict[str, str]:
    # A worker behind the portable backend's rlimit shim may be inside its second execve
    # (sh -> the program): for that instant the kernel shows an empty environment. Read
    # again until it has one (a worker's always holds PATH at least).
    deadline = time.monotonic() + 10
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        if raw or time.monotonic() > deadline:
            return dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)
        time.sleep(0.01)


async def staying(d, name: str, state: str, seconds: float) -> dict:
    """The worker stays in ``state`` with one pid for ``seconds`` (polled like a user)."""
    first = await d.worker(name)
    assert first["state"] == state, first
    with trio.move_on_after(seconds):
        while True:
            w = await d.worker(name)
            assert (w["state"], w["pid"]) == (state, first["pid"]), w
            await trio.sleep(0.1)
    return first


async def test_notify_worker_is_starting_until_ready_then_running(
    cfg: ConfigDir, start_daemon
) -> None:
    go = cfg.root / "go"
    notify_tenant(
        cfg,
        "rdy",
        f"wait_for({str(go)!r})\nsend('STATUS=warming up')\ntime.sleep(0.5)\n"
        "send('READY=1\\nSTATUS=serving 3 clients\\nMAINPID=1\\nERRNO=0')\n"
        "time.sleep(600)\n",
        'ready = "notify"',
        "policy = 'always'",
        autostart=False,
    )
    d = await start_daemon()
    await d.call("start", tenant="rdy")
    w = await d.wait_for("rdy:w-0", lambda w: w["pid"] is not None and pid_alive(w["pid"]))
    # Alive, but not ready: it has said nothing yet.
    w = await staying(d, "rdy:w-0", "starting", 1.5)
    env = environ(w["pid"])
    assert env["NOTIFY_SOCKET"] == w["notify_socket"]
    assert "WATCHDOG_USEC" not in env  # no watchdog configured
    assert w["status_text"] is None
    go.touch()
    await d.wait_for("rdy:w-0", lambda w: w["status_text"] == "warming up", timeout=30)
    assert (await d.worker("rdy:w-0"))["state"] == "starting"  # STATUS= is not READY=1
    ready = await d.wait_for("rdy:w-0", lambda w: w["state"] == "running", timeout=30)
    assert ready["pid"] == w["pid"] and ready["restarts"] == 0
    assert ready["status_text"] == "serving 3 clients"
    assert ready["notify_ignored"] == 0  # MAINPID=/ERRNO= are accepted, not held against it
    states = [
        (e["old"], e["new"])
        for e in await d.call("events", kind="state")
        if e["worker"] == "rdy:w-0"
    ]
    assert states == [("stopped", "starting"), ("starting", "running")]
    # The operator's view: the CLI's table shows what the worker said.
    shown = await trio.run_process(
        [CTL, "--socket", str(cfg.socket), "status", "rdy"], capture_stdout=True
    )
    header, row = shown.stdout.decode().splitlines()
    assert header.split()[-1] == "STATUS" and row.endswith("serving 3 clients")


async def test_notify_worker_that_never_says_ready_fails_after_start_timeout(
    cfg: ConfigDir, start_daemon
) -> None:
    notify_tenant(
        cfg,
        "mute",
        "time.sleep(600)\n",
        'ready = "notify"\nstart_timeout = 1.5',
        "policy = 'never'",
        autostart=False,
    )
    d = await start_daemon()
    await d.call("start", tenant="mute")
    w = await d.wait_for("mute:w-0", lambda w: w["pid"] is not None)
    assert w["state"] == "starting"
    done = await d.wait_for("mute:w-0", lambda w: w["state"] == "exited", timeout=30)
    assert done["exit_reason"] == "start-timeout"
    assert not pid_alive(w["pid"])  # killed, and reaped
    ends = [
        e
        for e in await d.call("events", kind="state")
        if e["worker"] == "mute:w-0" and e["new"] == "exited"
    ]
    assert [e["exit_reason"] for e in ends] == ["start-timeout"]


async def test_worker_that_stops_sending_watchdog_is_restarted(
    cfg: ConfigDir, start_daemon
) -> None:
    beating = cfg.root / "beating"
    beating.touch()
    notify_tenant(
        cfg,
        "dog",
        "n = 0\n"
        # The first run pings while the file exists; later runs ping for ever.
        f"first = os.path.exists({str(beating)!r})\n"
        f"while not first or os.path.exists({str(beating)!r}):\n"
        "    send('WATCHDOG=1'); time.sleep(0.2)\n"
        "time.sleep(600)\n",
        "watchdog = 2",
        "policy = 'always', backoff_initial = 0.05",
    )
    d = await start_daemon()
    w = await d.wait_for("dog:w-0", lambda w: w["state"] == "running")
    assert environ(w["pid"])["WATCHDOG_USEC"] == "2000000"
    # Pinging keeps it: longer than the watchdog, same process.
    await staying(d, "dog:w-0", "running", 3.0)
    beating.unlink()
    again = await d.wait_for(
        "dog:w-0", lambda x: x["pid"] not in (None, w["pid"]) and x["state"] == "running", 30
    )
    assert (again["exit_reason"], again["restarts"]) == ("watchdog", 1)
    assert not pid_alive(w["pid"])
    killed = [
        e
        for e in await d.call("events", kind="state")
        if e["worker"] == "dog:w-0" and e["old"] == "running"
    ]
    assert [(e["new"], e["exit_reason"]) for e in killed] == [("backoff", "watchdog")]


async def foreign_senders_are_ignored(cfg: ConfigDir, start_daemon, **daemon_opts) -> None:
    go = cfg.root / "go"
    notify_tenant(
        cfg,
        "own",
        # The worker's child, not the worker, says READY=1: one of its descendants, in
        # its partition leaf, so it counts (a pid the daemon has to ask the backend about;
        # it stays alive, as it must for its membership to be checked). Before that, its
        # own READY=1 in a datagram longer than the daemon reads (4 KiB): ignored whole.
        "send('READY=1\\n' + 'X' * 5000)\n"
        f"wait_for({str(go)!r})\nif os.fork() == 0:\n    send('READY=1')\ntime.sleep(600)\n",
        'ready = "notify"',
        "policy = 'always'",
        autostart=False,
    )
    d = await start_daemon(**daemon_opts)
    await d.call("start", tenant="own")
    w = await d.wait_for("own:w-0", lambda w: w["pid"] is not None)
    path = w["notify_socket"]
    # This test's own process (it is also the daemon's, in-process) claims readiness...
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\nSTATUS=forged", path)
    # ...and so does another process, started here, outside the worker's partition.
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'READY=1\\nSTATUS=forged too', sys.argv[1])\n"
    )
    await trio.run_process([sys.executable, "-c", code, path])
    seen = await d.wait_for("own:w-0", lambda w: w["notify_ignored"] == 3, timeout=30)
    assert (seen["state"], seen["status_text"], seen["pid"]) == ("starting", None, w["pid"])
    # A process in the worker's leaf still counts: the socket works, the senders were wrong.
    go.touch()
    ok = await d.wait_for("own:w-0", lambda w: w["state"] == "running", timeout=30)
    assert (ok["pid"], ok["notify_ignored"]) == (w["pid"], 3)


async def test_messages_from_outside_the_worker_leaf_are_ignored(
    cfg: ConfigDir, start_daemon
) -> None:
    await foreign_senders_are_ignored(cfg, start_daemon)


async def test_messages_from_outside_the_worker_cgroup_are_ignored(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon
) -> None:
    # cgroup v1: the leaf is a cgroup, and membership is what its cgroup.procs lists.
    await foreign_senders_are_ignored(cfg, start_daemon, backend="cgroup1", cgroup_root=cg.name)


@pytest.mark.parametrize("prefork", [True, False], ids=["fork-server", "plain-runner"])
async def test_wasm_tenant_signals_readiness_through_the_runner_import(
    cfg: ConfigDir, start_daemon, prefork: bool
) -> None:
    cfg.tenant(
        "wnote",
        f"""
        autostart = false
        memory = {{ max = "128MiB" }}
        restart = {{ policy = "always", backoff_initial = 0.05 }}
        [[worker]]
        name = "w"
        wasm = "{NOTIFY_WAT}"
        ready = "notify"
        start_timeout = 30
        watchdog = 2
        """,
    )
    d = await start_daemon(wasm_prefork=prefork)
    await d.call("start", tenant="wnote")
    w = await d.wait_for("wnote:w-0", lambda w: w["state"] == "running", timeout=30)
    assert w["status_text"] == "serving"
    # Started the way the test asked (the fork server's children are the daemon's too).
    assert (d.daemon.supervisor.launchers.forkserver_pid is not None) is prefork
    # Its WATCHDOG=1 every 200 ms keeps it past the 2 s watchdog.
    await staying(d, "wnote:w-0", "running", 3.0)
    assert (await d.worker("wnote:w-0"))["restarts"] == 0


async def test_a_flooding_worker_does_not_starve_the_daemon(cfg: ConfigDir, start_daemon) -> None:
    flooding = cfg.root / "flooding"
    flooding.touch()
    notify_tenant(
        cfg,
        "flood",
        "send('READY=1')\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.setblocking(False)\n"
        "n = 0\n"
        f"while os.path.exists({str(flooding)!r}):\n"
        "    for _ in range(1000):\n"
        "        n += 1\n"
        "        try: s.sendto(f'STATUS=flood {n}'.encode(), os.environ['NOTIFY_SOCKET'])\n"
        "        except BlockingIOError: pass\n"
        "time.sleep(600)\n",
        'ready = "notify"',
        "policy = 'always'",
    )
    cfg.tenant(
        "calm",
        f"""
        [[worker]]
        name = "w"
        command = {worker_py("import time; time.sleep(600)")}
        """,
    )
    d = await start_daemon()
    seen = set()
    # While the socket is never empty, every control call is still answered, and the
    # flood itself is being read (its STATUS= keeps changing).
    for _ in range(20):
        with trio.fail_after(20):
            w = await d.worker("flood:w-0")
            assert await d.call("ping") == "pong"
        assert w["state"] == "running" and w["notify_ignored"] == 0
        seen.add(w["status_text"])
        await trio.sleep(0.05)
    flooding.unlink()
    assert len(seen - {None}) >= 2
    assert (await d.worker("calm:w-0"))["state"] == "running"


@pytest.mark.parametrize("planted", ["file", "symlink"])
async def test_a_notify_socket_that_cannot_be_made_fails_only_its_worker(
    cfg: ConfigDir, start_daemon, planted: str
) -> None:
    # Something planted a file, or a symlink to a directory elsewhere, where the
    # sockets' directory goes.
    (cfg.root / "state").mkdir()
    elsewhere = cfg.root / "elsewhere"
    elsewhere.mkdir()
    if planted == "file":
        (cfg.root / "state" / "notify").write_text("not a directory")
    else:
        (cfg.root / "state" / "notify").symlink_to(elsewhere)
    notify_tenant(cfg, "nosock", "send('READY=1')\ntime.sleep(600)\n", 'ready = "notify"', "")
    cfg.tenant(
        "plain",
        f"""
        [[worker]]
        name = "w"
        command = {worker_py("import time; time.sleep(600)")}
        """,
    )
    d = await start_daemon()
    w = await d.wait_for("nosock:w-0", lambda w: w["state"] == "fatal")
    assert (
        w["exit_reason"] == "spawn-failed: no NOTIFY_SOCKET for this worker (see the daemon's log)"
    )
    assert (await d.worker("plain:w-0"))["state"] == "running"
    assert await d.call("ping") == "pong"
    assert list(elsewhere.iterdir()) == []  # no socket followed the symlink
