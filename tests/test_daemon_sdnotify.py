"""sd_notify through the real daemon: ``supervisord-qnx`` as a subprocess talking to a
real ``AF_UNIX`` datagram socket bound here, the way systemd (``Type=notify``) or any
manager speaking the protocol sees it.

The listener turns on ``SO_PASSCRED`` so every datagram carries the sender's pid, as
systemd's does: with ``NotifyAccess=main`` it drops messages from any other process,
so the daemon itself, not a helper or a worker, must send them.
"""

from __future__ import annotations

import itertools
import shlex
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_qnx.control.client import Client
from tests.conftest import ConfigDir, cli_env, pid_alive, worker_py
from tests.daemonproc import DAEMON

pytestmark = pytest.mark.integration

MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Prints the names of its environment variables, then stays up.
SHOW_ENV = worker_py(
    "import os, time\nprint('ENV', ' '.join(sorted(os.environ)), flush=True)\ntime.sleep(600)\n"
)
BEAT = worker_py("import time\nwhile True: time.sleep(0.2)")


class Listener:
    """The service manager's end: a bound datagram socket that records who sent what."""

    def __init__(self) -> None:
        self.path = Path(f"/tmp/sqnx-notify-{uuid.uuid4().hex[:10]}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))

    def receive(self, timeout: float) -> tuple[str, int, float] | None:
        """One message: (text, sender pid, monotonic arrival time), or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
        except TimeoutError:
            return None
        arrived = time.monotonic()
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = CREDS.unpack(payload[: CREDS.size])[0]
        return data.decode(), pid, arrived

    def wait_for(self, wanted: str, timeout: float) -> tuple[str, int, float]:
        """The first message holding the line ``wanted``; earlier ones are skipped."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and wanted in got[0].splitlines():
                return got
        raise AssertionError(f"no {wanted!r} within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


class Daemon:
    """``supervisord-qnx`` started through ``sh -c 'exec ...'`` so that the shell can
    put its own pid, which the daemon keeps after exec, in ``WATCHDOG_PID``: what
    systemd does for the main process."""

    def __init__(self, cfg: ConfigDir, env: dict[str, str], watchdog_pid: str) -> None:
        self.cfg = cfg
        self.out = open(cfg.root / "daemon.out", "w+")  # noqa: SIM115 - closed in stop()
        prefix = {"self": "WATCHDOG_PID=$$ ", "unset": "", "other": "WATCHDOG_PID=1 "}
        command = prefix[watchdog_pid] + "exec " + shlex.join([DAEMON, "--config", str(cfg.path)])
        self.proc = subprocess.Popen(
            ["sh", "-c", command], env=env, stdout=self.out, stderr=subprocess.STDOUT
        )

    def call(self, method: str, **params: object) -> object:
        with Client(self.cfg.socket) as c:
            return c.call(method, **params)

    def output(self) -> str:
        self.out.flush()
        return (self.cfg.root / "daemon.out").read_text()

    def stop(self) -> None:
        # Gracefully, so no worker outlives the test; SIGKILL only if that hangs.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.out.close()


@pytest.fixture
def start(cfg: ConfigDir, listener: Listener) -> Iterator[object]:
    started: list[Daemon] = []

    def run(watchdog_usec: int | None = None, watchdog_pid: str = "unset") -> Daemon:
        env = cli_env()
        for key in MANAGER_VARIABLES:
            env.pop(key, None)
        env["NOTIFY_SOCKET"] = str(listener.path)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        d = Daemon(cfg, env, watchdog_pid)
        started.append(d)
        return d

    yield run
    for d in started:
        d.stop()


def tenants(cfg: ConfigDir) -> None:
    cfg.tenant(
        "envshow",
        f"""
        [[worker]]
        name = "show"
        command = {SHOW_ENV}
        """,
    )
    cfg.tenant(
        "many",
        f"""
        [[worker]]
        name = "beat"
        command = {BEAT}
        instances = 4
        """,
    )
    cfg.tenant(
        "manual",
        f"""
        autostart = false
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )
    cfg.write()


def test_ready_only_once_every_autostart_tenant_is_up_then_stopping(
    cfg: ConfigDir, listener: Listener, start
) -> None:
    tenants(cfg)
    d = start()
    text, sender, ready_at = listener.wait_for("READY=1", 30)
    assert sender == d.proc.pid, "NotifyAccess=main: the daemon itself must send READY"
    assert "STATUS=tenants started" in text.splitlines()
    # What a manager that starts dependants on READY would find.
    # Taken before the call: the daemon computed each uptime at some moment between this
    # and the answer, so ``asked_at - uptime`` is at most the true start (a moment taken
    # after the answer would add the round trip, which a loaded machine makes > 10 ms).
    asked_at = time.monotonic()
    status = {w["name"]: w for w in d.call("status")}
    assert status["manual:beat-0"]["state"] == "stopped", "autostart = false stays down"
    up = {n: w for n, w in status.items() if w["tenant"] != "manual"}
    assert len(up) == 5
    for name, w in up.items():
        assert w["state"] == "running" and pid_alive(w["pid"]), name
        # uptime says when it started (the same monotonic clock for every process):
        # before READY arrived, not after.
        started_at = asked_at - w["uptime"]
        assert started_at <= ready_at + 0.01, f"{name} started after READY"
    # SIGTERM: STOPPING=1 from the daemon, then a clean exit.
    d.proc.send_signal(signal.SIGTERM)
    _text, sender, _ = listener.wait_for("STOPPING=1", 30)
    assert sender == d.proc.pid
    assert d.proc.wait(30) == 0, d.output()
    assert all(not pid_alive(w["pid"]) for w in up.values())


def test_workers_do_not_inherit_the_managers_variables(
    cfg: ConfigDir, listener: Listener, start
) -> None:
    tenants(cfg)
    d = start(watchdog_usec=10_000_000, watchdog_pid="self")
    listener.wait_for("READY=1", 30)
    deadline = time.monotonic() + 15
    lines: list[str] = []
    while not any(line.startswith("ENV ") for line in lines):
        assert time.monotonic() < deadline, "the env worker printed nothing"
        (log,) = d.call("logs", tenant="envshow")
        lines = log["lines"]
        time.sleep(0.05)
    names = next(line for line in lines if line.startswith("ENV ")).split()[1:]
    assert "PATH" in names and "SUPERVISORD_QNX_LEAF" in names  # the env it was given
    for key in MANAGER_VARIABLES:
        assert key not in names, f"a worker could speak for the daemon through {key}"
    # The same from outside, for every autostart worker.
    for w in d.call("status"):
        if w["pid"]:
            env = Path(f"/proc/{w['pid']}/environ").read_bytes().split(b"\0")
            assert not any(e.split(b"=", 1)[0].decode() in MANAGER_VARIABLES for e in env)


@pytest.mark.parametrize("owner", ["self", "unset"])
def test_watchdog_pings_at_half_the_interval(
    cfg: ConfigDir, listener: Listener, start, owner: str
) -> None:
    cfg.tenant("many", f"[[worker]]\nname = 'beat'\ncommand = {BEAT}\n")
    cfg.write()
    d = start(watchdog_usec=400_000, watchdog_pid=owner)  # a ping every 0.2 s
    listener.wait_for("READY=1", 30)
    pings = []
    deadline = time.monotonic() + 1.5
    while (left := deadline - time.monotonic()) > 0:
        got = listener.receive(left)
        if got is not None and got[0] == "WATCHDOG=1":
            assert got[1] == d.proc.pid
            pings.append(got[2])
    # 1.5 s at one ping per 0.2 s is ~7; a loaded 2-core box may delay a few.
    assert len(pings) >= 4, f"{len(pings)} pings in 1.5 s"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.1 < g < 0.45 for g in gaps), gaps  # well inside the 0.4 s interval


def test_no_watchdog_pings_when_the_watchdog_names_another_process(
    cfg: ConfigDir, listener: Listener, start
) -> None:
    cfg.tenant("many", f"[[worker]]\nname = 'beat'\ncommand = {BEAT}\n")
    cfg.write()
    d = start(watchdog_usec=200_000, watchdog_pid="other")
    listener.wait_for("READY=1", 30)
    later = [listener.receive(1.0)]
    assert later == [None], "WATCHDOG_PID is pid 1: the watchdog is not the daemon's"
    d.proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", 30)
    assert d.proc.wait(30) == 0
