"""supervisord-qnx against supervisord, circus and s6, side by side on this machine.

Every tool runs as its own daemon process from its own CLI, supervising the same N
single-process workers (``sleep 1000``), each with its own log file; supervisord-qnx gives
each worker its own tenant (= partition) and runs with its default restart policy.
Measured, for each tool and each N (``--count 100 1000`` by default):

* **launch**: daemon process start → every worker running (autostart), what a boot sees.
  Best of ``--launch-rounds`` fresh daemons.
* **start N**: the daemon is up with every worker configured but not started; the clock
  runs from the first "start" request to the first status reply in which all N are
  running (polled every 10 ms over the tool's own control socket). Best of ``--rounds``.
  Each tool is polled with the cheapest question that answers "all running?", so that
  the poll disturbs the launch it times as little as it can: supervisord-qnx's
  ``status`` with ``fields`` (tenant, state and pid only, docs/protocol.md),
  supervisord's ``getAllProcessInfo``, circus's ``status``, s6's status files.
  The floor is the same N spawns done with plain ``subprocess.Popen`` in this process.
* **restart after SIGKILL**: kill one worker's process (it has run for many seconds); the
  clock runs until status shows a new pid running (polled back to back). p50/p95 over
  ``--kills`` kills; then again while another worker crash-loops (exits 0.1 s after each
  start, never given up on).
* **status**: one full status call at N workers, p50/p99 over ``--status-calls`` calls on
  one connection, idle and while 8 other clients (processes) call status back to back.
  supervisord-qnx: the blocking ``Client``, asking for every field of every worker in
  the table form (``status`` with ``table``, what ``supervisorctl-qnx status`` asks;
  the list of maps, its other form, has a row of its own); supervisord: XML-RPC
  ``getAllProcessInfo``; circus: its ``status`` command; s6: reading each
  ``supervise/status`` file, as ``s6-svstat`` does.
* **RSS** of the supervisor's processes (s6: s6-svscan plus every s6-supervise) with N
  configured and none running, with N running (0.5 s after the last started, and for
  the daemon process again 11 s after: once the threads of the start's burst idled out),
  and the difference per worker; after
  ``--churn`` restarts of a worker that exits at once (ours), and the growth over them.
  Also the PSS of the same processes (shared pages split between them: forked processes
  such as our log writers or s6's supervise processes share most of theirs) and the RSS
  of the daemon process alone.
* **idle CPU**: the supervisor's user + system CPU over ``--idle`` seconds with N running,
  from ``/proc/<pid>/stat``, as a percent of one CPU.
* **stop all**: from the shutdown request until every worker process is gone (issue 14's
  definition; one pidfd per worker, the same for every tool), and until the daemon
  process has exited (every worker stopped and, for supervisord-qnx, every partition
  removed and every log line written).

The peers are installed by ``make bench-deps``: supervisord, circus and the profilers
into their own virtualenv, ``bench/.venv-compare`` (never the project's), s6 from
Debian's package. Circus needs pyzmq for its client, so its figures are taken by this
same script run under the compare venv's interpreter and merged. A tool that cannot run
is listed as skipped with the reason.

    .venv/bin/python bench/bench_supervisor.py [--count 100 1000] [--json] [--only TOOL ...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMPARE = HERE / "compare"
COMPARE_VENV = HERE / ".venv-compare"
PROJECT_BIN = Path(sys.executable).parent
COMMAND = ["sleep", "1000"]
POLL = 0.01  # status polling interval while waiting for "all running"
TOOLS = ("qnx-portable", "qnx-cgroup1", "floor", "supervisord", "circus", "s6")
# A worker that crashes 0.1 s after each start, kept looping (never given up on) while
# another worker's restart is timed; and ours given a budget that never runs out.
CRASH_LOOP = ["sh", "-c", "sleep 0.1; exit 1"]
CRASH_LOOP_RESTART = 'restart = { policy = "always", max_restarts = 1000000000 }'
# The churn worker (RSS after many restarts) restarts with no delay at all.
CHURN_RESTART = (
    'restart = { policy = "always", backoff_initial = 0, backoff_max = 0, '
    "max_restarts = 1000000000 }"
)
# Control clients hammering `status` while its latency is measured under load.
HAMMERS = 8


class Skip(Exception):
    """This tool cannot be measured here; ``str()`` says why."""


# --------------------------------------------------------------------------- /proc figures


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them, so
    that forked processes (our log writers, s6's supervise processes) add up honestly."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return as soon as ``proc`` has exited. ``Popen.wait`` with a timeout polls with
    sleeps growing to 50 ms (Python < 3.13): a daemon that exits 64 ms after the shutdown
    request was timed at 113 ms. A pidfd becomes readable at the exit itself."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd here: the polling wait
        proc.wait(timeout)
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    proc.wait()


def open_pidfds(pids: list[int]) -> list[int]:
    """A pidfd for each pid still running (one that is already gone needs no wait)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(pids) + 64
    if soft < want <= hard or (hard == resource.RLIM_INFINITY and soft < want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    return fds


def wait_pidfds(fds: list[int], timeout: float) -> None:
    """Return when every process behind ``fds`` has exited (its pidfd readable); close
    them. Readiness of a pidfd is the exit itself, not a poll of /proc."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left, deadline = len(fds), time.monotonic() + timeout
    try:
        while left:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            ready = poller.poll(wait_ms)
            if not ready:
                raise TimeoutError(f"{left} workers still running after {timeout:g}s")
            for fd, _ in ready:
                poller.unregister(fd)
                left -= 1
    finally:
        for fd in fds:
            os.close(fd)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- adapters


class Tool:
    """One supervisor daemon under test. Subclasses speak its control protocol."""

    label = ""
    names: list[str]
    max_kills = 1_000_000

    def __init__(self, count: int, workdir: Path) -> None:
        self.count = count
        self.dir = workdir
        self.names = [f"w{i}" for i in range(count)]
        # Workers beyond the N, configured but not started: {name: argv}.
        self.extra: dict[str, list[str]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "log").mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def daemon_pids(self) -> list[int]:
        """The processes that make up the supervisor (not its workers): RSS and CPU are
        summed over them."""
        return [self.pid]

    def launch(self, autostart: bool = False) -> None:
        """Start the daemon with every worker configured (``autostart``: started by the
        daemon itself, as at boot) and return once it answers its control socket."""
        raise NotImplementedError

    def hammer_argv(self) -> list[str]:
        """A command that calls ``status`` in a loop until killed (see ``hammer``)."""
        return [sys.executable, __file__, "--hammer", self.hammer_target()]

    def hammer_target(self) -> str:
        raise NotImplementedError

    def start_all(self) -> None:
        raise NotImplementedError

    def stop_all(self) -> None:
        raise NotImplementedError

    def states(self) -> dict[str, tuple[str, int | None]]:
        """name -> (running | something else, pid)."""
        raise NotImplementedError

    def status_call(self) -> None:
        raise NotImplementedError

    def worker(self, name: str) -> tuple[str, int | None]:
        return self.states()[name]

    def start_extra(self, name: str) -> None:
        raise Skip(f"{self.label}: no crash-loop measurement ({name})")

    def stop_extra(self, name: str) -> None:
        raise Skip(f"{self.label}: no crash-loop measurement ({name})")

    def restarts(self, name: str) -> int:
        raise Skip(f"{self.label}: no restart counter ({name})")

    def status_floor(self, calls: int) -> tuple[list[float], float]:  # noqa: ARG002
        """What a status call costs outside the daemon's own work: latencies of the
        cheapest call on the same connection, and the client's decode of one full reply."""
        raise Skip(f"{self.label}: no floor measured")

    def shutdown(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.dir / "daemon.out", "wb")  # noqa: SIM115 - lives as long as the daemon
        self.proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        out.close()

    def output(self) -> str:
        return (self.dir / "daemon.out").read_text(errors="replace")[-2000:]


class Qnx(Tool):
    def __init__(self, count: int, workdir: Path, backend: str) -> None:
        super().__init__(count, workdir)
        self.backend = backend
        self.label = f"supervisord-qnx ({backend})"
        self.socket = Path(f"/tmp/sqnx-bench-{uuid.uuid4().hex[:8]}.sock")
        self.cgroup_root = f"sqnx-bench-{uuid.uuid4().hex[:8]}"
        self.client: Any = None

    def launch(self, autostart: bool = False) -> None:
        from supervisord_qnx.control.client import Client

        tenants = self.dir / "tenants.d"
        tenants.mkdir(exist_ok=True)
        template = (COMPARE / "tenant.toml.in").read_text()
        for name in self.names:
            (tenants / f"{name}.toml").write_text(
                template.format(
                    name=name,
                    autostart=str(autostart).lower(),
                    command=json.dumps(COMMAND),
                    restart="",
                )
            )
        for name, command in self.extra.items():
            (tenants / f"{name}.toml").write_text(
                template.format(
                    name=name,
                    autostart="false",
                    command=json.dumps(command),
                    restart=CHURN_RESTART if name == "churn" else CRASH_LOOP_RESTART,
                )
            )
        config = self.dir / "daemon.toml"
        config.write_text(
            "[daemon]\n"
            f'socket = "{self.socket}"\n'
            'state_dir = "state"\nlog_dir = "log"\n'
            f'backend = "{self.backend}"\n'
            'enforcement = "best-effort"\n'
            'log_level = "warning"\n'
            f'cgroup_root = "{self.cgroup_root}"\n'
            '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
        )
        self._spawn([str(PROJECT_BIN / "supervisord-qnx"), "--config", str(config)])
        self.client = Client(self.socket, timeout=60)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"supervisord-qnx exited: {self.output()}")
            try:
                return bool(self.client.call("ping") == "pong")
            except OSError:
                self.client.close()
                return False

        wait_for(up, 60, "supervisord-qnx to answer ping")

    def daemon_pids(self) -> list[int]:
        # The daemon and its workers' log writers (one process per worker instance, see
        # docs/logging.md): like s6's supervise processes, they are the supervisor's cost.
        # Writers are started from the daemon's worker threads: every thread's children.
        children = [
            c
            for task in Path(f"/proc/{self.pid}/task").iterdir()
            for c in _read(task / "children").split()
        ]
        return [self.pid, *(int(c) for c in children if _is_log_writer(c))]

    def start_all(self) -> None:
        for name in self.names:
            self.client.call("start", tenant=name)

    def stop_all(self) -> None:
        for name in self.names:
            self.client.call("stop", tenant=name, wait=False)

    def states(self) -> dict[str, tuple[str, int | None]]:
        # The compact form: a full reply, every worker's scheduling read from the kernel,
        # cost the daemon 3-5 ms of CPU per poll at N = 1000 during the launch it timed.
        return {
            w["tenant"]: (w["state"], w["pid"])
            for w in self.client.call("status", fields=["tenant", "state", "pid"])
            if w["tenant"] not in self.extra
        }

    def worker(self, name: str) -> tuple[str, int | None]:
        w = self.client.call("status", tenant=name)[0]
        return w["state"], w["pid"]

    def status_call(self) -> None:
        self.client.call("status", table=True)

    def status_maps_call(self) -> None:
        self.client.call("status")

    def hammer_target(self) -> str:
        return f"qnx:{self.socket}"

    def start_extra(self, name: str) -> None:
        self.client.call("start", tenant=name)

    def stop_extra(self, name: str) -> None:
        self.client.call("stop", tenant=name)

    def restarts(self, name: str) -> int:
        return int(self.client.call("status", tenant=name)[0]["restarts"])

    def status_floor(self, calls: int) -> tuple[list[float], float]:
        import msgpack

        pings = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.client.call("ping")
            pings.append(time.perf_counter() - t0)
        reply = msgpack.packb(self.client.call("status", table=True))
        rounds = 200
        t0 = time.perf_counter()
        for _ in range(rounds):
            msgpack.unpackb(reply)
        return pings, (time.perf_counter() - t0) / rounds

    def shutdown(self) -> None:
        self.client.call("shutdown")
        self.client.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        super().close()
        self.socket.unlink(missing_ok=True)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a thread that ended since the listing
        return ""


def _is_log_writer(pid: str) -> bool:
    try:
        return b"logwriter" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone since the listing
        return False


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket, one kept-alive connection."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = self._connection[1]
        if conn is None:
            conn = _UnixHTTPConnection(self.path)
            self._connection = (host, conn)
        return conn


class Supervisord(Tool):
    label = "supervisord"

    def launch(self, autostart: bool = False) -> None:
        binary = COMPARE_VENV / "bin" / "supervisord"
        if not binary.exists():
            raise Skip(f"{binary} missing (make bench-deps)")
        text = (COMPARE / "supervisord.conf.in").read_text().format(dir=self.dir)
        program = (COMPARE / "supervisord-program.conf.in").read_text()
        for name in self.names:
            text += program.format(
                name=name, dir=self.dir, autostart=str(autostart).lower(), command=" ".join(COMMAND)
            )
        for name, command in self.extra.items():
            text += program.format(
                name=name, dir=self.dir, autostart="false", command=shlex.join(command)
            )
        # One group for all: supervisord stops groups one after another, waiting for each
        # (a program outside any group is its own group), which made its shutdown take
        # ~0.8 s per worker; a group stops its programs together.
        text += f"\n[group:all]\nprograms = {','.join(self.names)}\n"
        if self.extra:
            text += f"\n[group:extra]\nprograms = {','.join(self.extra)}\n"
        config = self.dir / "supervisord.conf"
        config.write_text(text)
        self._spawn([str(binary), "-c", str(config)])
        sock = str(self.dir / "supervisor.sock")
        # Any: XML-RPC answers are whatever supervisord's methods return.
        self.rpc: Any = xmlrpc.client.ServerProxy(
            "http://localhost", transport=_UnixTransport(sock)
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited: {self.output()}")
            try:
                return bool(self.rpc.supervisor.getState()["statename"] == "RUNNING")
            except (OSError, xmlrpc.client.Fault, http.client.HTTPException):
                self.rpc("transport").close()
                return False

        wait_for(up, 60, "supervisord to answer getState")

    def start_all(self) -> None:
        self.rpc.supervisor.startProcessGroup("all", False)

    def stop_all(self) -> None:
        self.rpc.supervisor.stopProcessGroup("all", False)

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {
            p["name"]: ("running" if p["statename"] == "RUNNING" else p["statename"], p["pid"])
            for p in self.rpc.supervisor.getAllProcessInfo()
            if p["name"] not in self.extra
        }

    def hammer_target(self) -> str:
        return f"supervisord:{self.dir / 'supervisor.sock'}"

    def start_extra(self, name: str) -> None:
        self.rpc.supervisor.startProcess(f"extra:{name}", False)

    def stop_extra(self, name: str) -> None:
        self.rpc.supervisor.stopProcess(f"extra:{name}")

    def worker(self, name: str) -> tuple[str, int | None]:
        p = self.rpc.supervisor.getProcessInfo(f"all:{name}")
        return ("running" if p["statename"] == "RUNNING" else p["statename"]), p["pid"]

    def status_call(self) -> None:
        self.rpc.supervisor.getAllProcessInfo()

    def shutdown(self) -> None:
        self.rpc.supervisor.shutdown()


class Circus(Tool):
    label = "circus"
    # Circus respawns a killed process only on its next periodic check (check_delay, 5 s
    # by default), so each kill costs ~5 s; a few show the figure without a long run.
    max_kills = 4

    def launch(self, autostart: bool = False) -> None:
        try:
            from circus.client import CircusClient
        except ImportError as exc:
            raise Skip(f"circus is not importable here: {exc}") from None
        text = (COMPARE / "circus.ini.in").read_text().format(dir=self.dir)
        watcher = (COMPARE / "circus-watcher.ini.in").read_text()
        for name in self.names:
            # Circus's start-all only starts autostart watchers, so they are configured
            # autostart and stopped once circusd is up (below).
            text += watcher.format(
                name=name, dir=self.dir, autostart="True", command=" ".join(COMMAND)
            )
        config = self.dir / "circus.ini"
        config.write_text(text)
        self._spawn([str(Path(sys.executable).parent / "circusd"), str(config)])
        self.client = CircusClient(endpoint=f"ipc://{self.dir}/endpoint", timeout=60)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"circusd exited: {self.output()}")
            return bool(self._call("status").get("status") == "ok")

        wait_for(up, 60, "circusd to answer status")
        if not autostart:
            wait_for(lambda: all_running(self), 120, "circus: autostart done")
            self.stop_all()
            wait_for(lambda: none_running(self), 120, "circus: all stopped")

    def hammer_target(self) -> str:
        return f"circus:ipc://{self.dir}/endpoint"

    def _call(self, command: str, **props: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call({"command": command, "properties": props})
        return result

    def start_all(self) -> None:
        self._call("start")

    def stop_all(self) -> None:
        self._call("stop")

    def states(self) -> dict[str, tuple[str, int | None]]:
        statuses = self._call("status")["statuses"]
        return {n: ("running" if s == "active" else s, None) for n, s in statuses.items()}

    def worker(self, name: str) -> tuple[str, int | None]:
        pids = self._call("list", name=name).get("pids") or []
        return ("running" if pids else "stopped"), (pids[0] if pids else None)

    def status_call(self) -> None:
        self._call("status")

    def shutdown(self) -> None:
        self._call("quit")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop()
        super().close()


class S6(Tool):
    """s6 2.11 (Debian's package): ``s6-svscan`` on a scan directory, one
    ``s6-supervise`` process per service. Control is ``s6-svc``; status is read the way
    ``s6-svstat`` does, from each service's ``supervise/status`` file."""

    label = "s6"
    # s6-supervise waits 1 s before restarting a service that died within 1 s of its
    # start; kills of long-running services are immediate.

    def launch(self, autostart: bool = False) -> None:
        binary = shutil.which("s6-svscan")
        if binary is None:
            raise Skip("s6-svscan missing (make bench-deps: apt-get install s6)")
        self.scan = self.dir / "scan"
        self.scan.mkdir()
        for name in self.names:
            self._service(name, COMMAND, up=autostart)
        for name, command in self.extra.items():
            self._service(name, command, up=False)
        # -c: s6-svscan supervises at most 500 services unless told more (s6-svscan(8)):
        # without it a run of 1000 never saw the 501st service come up.
        self._spawn([binary, "-c", str(len(self.all) + 1), str(self.scan)])
        wait_for(
            lambda: all((self.scan / n / "supervise" / "status").exists() for n in self.all),
            60,
            "s6-supervise in every service",
        )

    def daemon_pids(self) -> list[int]:
        # s6-svscan and one s6-supervise per service: the supervisor is all of them.
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return [self.pid, *map(int, children)]

    @property
    def all(self) -> list[str]:
        return [*self.names, *self.extra]

    def _service(self, name: str, command: list[str], *, up: bool) -> None:
        d = self.scan / name
        d.mkdir()
        log = self.dir / "log" / f"{name}.log"
        run = d / "run"
        run.write_text(f"#!/bin/sh\nexec >>{log} 2>&1\nexec {shlex.join(command)}\n")
        run.chmod(0o755)
        if not up:
            (d / "down").touch()

    def _pid(self, name: str) -> int | None:
        # supervise/status (s6 2.11): stamp (12 bytes), ready stamp (12), pid (8, big
        # endian), wait status (2), flags (1); pid 0 means down.
        try:
            data = (self.scan / name / "supervise" / "status").read_bytes()
        except FileNotFoundError:
            return None
        (pid,) = struct.unpack_from(">Q", data, 24)
        return pid or None

    def _svc(self, flag: str, names: list[str]) -> None:
        # What ``s6-svc -u``/``-d`` does (it takes one service per call): write the
        # command byte into each service's supervise/control FIFO.
        for n in names:
            fd = os.open(self.scan / n / "supervise" / "control", os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, flag[1:].encode())
            finally:
                os.close(fd)

    def start_all(self) -> None:
        self._svc("-u", self.names)

    def stop_all(self) -> None:
        self._svc("-d", self.names)

    def states(self) -> dict[str, tuple[str, int | None]]:
        out: dict[str, tuple[str, int | None]] = {}
        for name in self.names:
            pid = self._pid(name)
            out[name] = ("running" if pid else "down", pid)
        return out

    def worker(self, name: str) -> tuple[str, int | None]:
        pid = self._pid(name)
        return ("running" if pid else "down"), pid

    def status_call(self) -> None:
        self.states()

    def hammer_target(self) -> str:
        return f"s6:{self.scan}"

    def start_extra(self, name: str) -> None:
        self._svc("-u", [name])

    def stop_extra(self, name: str) -> None:
        self._svc("-d", [name])

    def shutdown(self) -> None:
        # -t: every service brought down, then s6-svscan exits.
        subprocess.run(["s6-svscanctl", "-t", str(self.scan)], check=True)

    def close(self) -> None:
        # Killing s6-svscan alone would leave its s6-supervise processes and workers.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.shutdown()
                self.proc.wait(30)
        super().close()


# --------------------------------------------------------------------------- measurements


def all_running(tool: Tool) -> bool:
    states = tool.states()
    return len(states) == tool.count and all(s == "running" for s, _ in states.values())


def none_running(tool: Tool) -> bool:
    return all(s != "running" for s, _ in tool.states().values())


def launch_time(make: Callable[[], Tool]) -> float:
    """Daemon process start → every worker running, the way a boot sees it."""
    tool = make()
    try:
        t0 = time.perf_counter()
        tool.launch(autostart=True)
        wait_for(lambda: all_running(tool), 300, f"{tool.label}: all running after launch")
        took = time.perf_counter() - t0
        tool.shutdown()
        assert tool.proc is not None
        tool.proc.wait(300)
    finally:
        tool.close()
    return took


def status_latencies(tool: Tool, calls: int, call: Callable[[], None] | None = None) -> list[float]:
    call = call or tool.status_call
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    return lat


def status_under_load(tool: Tool, calls: int) -> list[float]:
    """Status latency while ``HAMMERS`` other clients call status back to back."""
    hammers = [
        subprocess.Popen(tool.hammer_argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(HAMMERS)
    ]
    try:
        time.sleep(0.5)
        for h in hammers:
            if h.poll() is not None:
                raise RuntimeError(f"a status hammer died: {h.stderr.read() if h.stderr else ''!r}")
        return status_latencies(tool, calls)
    finally:
        for h in hammers:
            h.kill()
            h.wait()


def restart_times(tool: Tool, kills: int, offset: int = 0) -> list[float]:
    """SIGKILL a worker that has been running a while; time until a new pid runs."""
    restarts = []
    for i in range(kills):
        name = tool.names[(offset + i) % tool.count]
        state, old = tool.worker(name)
        assert state == "running" and old, (name, state, old)
        os.kill(old, signal.SIGKILL)
        t0 = time.perf_counter()
        deadline = time.monotonic() + 30
        while True:
            state, pid = tool.worker(name)
            if state == "running" and pid and pid != old:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tool.label}: {name} not back after SIGKILL")
            time.sleep(0.0002)
        restarts.append(time.perf_counter() - t0)
    return restarts


def churn(tool: Tool, out: dict[str, Any], restarts: int) -> None:
    """RSS before and after ``restarts`` restarts of a worker that exits at once."""
    if "churn" not in tool.extra:
        return
    tool.start_extra("churn")
    rss0 = rss_bytes(tool.pid)
    wait_for(lambda: tool.restarts("churn") >= restarts, 600, f"{restarts} restarts", 0.5)
    tool.stop_extra("churn")
    time.sleep(0.5)
    out["rss_after_churn"] = rss_bytes(tool.pid)
    out["churn_growth"] = out["rss_after_churn"] - rss0


def measure(make: Callable[[], Tool], args: argparse.Namespace) -> dict[str, Any]:
    launches = [launch_time(make) for _ in range(args.launch_rounds)]
    tool = make()
    tool.extra = {"crashloop": CRASH_LOOP}
    if args.churn and isinstance(tool, Qnx):
        tool.extra["churn"] = ["true"]
    out: dict[str, Any] = {"tool": tool.label, "launch_best": min(launches)}
    out["launch_first"] = launches[0]
    tool.launch()
    try:
        time.sleep(0.5)  # let start-up work (imports, partition creation) settle
        out["rss_idle"] = sum(map(rss_bytes, tool.daemon_pids()))
        out["rss_daemon_idle"] = rss_bytes(tool.pid)
        starts = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            tool.start_all()
            wait_for(lambda: all_running(tool), 300, f"{tool.label}: all running")
            starts.append(time.perf_counter() - t0)
            if r < args.rounds - 1:
                tool.stop_all()
                wait_for(lambda: none_running(tool), 300, f"{tool.label}: all stopped")
                time.sleep(0.2)
        out["start_best"] = min(starts)
        out["start_first"] = starts[0]
        time.sleep(0.5)
        out["rss_running"] = sum(map(rss_bytes, tool.daemon_pids()))
        out["rss_daemon_running"] = rss_bytes(tool.pid)
        out["pss_running"] = sum(map(pss_bytes, tool.daemon_pids()))
        out["rss_per_worker"] = (out["rss_running"] - out["rss_idle"]) / tool.count
        # The daemon process alone (issue 14's target): log writers and s6's supervise
        # processes left out, so what the daemon itself keeps per running worker.
        out["rss_daemon_per_worker"] = (
            out["rss_daemon_running"] - out["rss_daemon_idle"]
        ) / tool.count

        pids = tool.daemon_pids()
        c0, t0 = sum(map(cpu_seconds, pids)), time.monotonic()
        time.sleep(args.idle)
        used = sum(map(cpu_seconds, pids)) - c0
        out["idle_cpu_pct"] = 100 * used / (time.monotonic() - t0)
        # Again once the start's burst is over (its pool threads idle out: trio keeps
        # them 10 s): what the daemon holds for N running workers, not for starting them.
        time.sleep(max(0.0, 11 - args.idle))
        out["rss_daemon_settled"] = rss_bytes(tool.pid)

        lat = status_latencies(tool, args.status_calls)
        out["status_p50"], out["status_p99"] = pct(lat, 0.5), pct(lat, 0.99)
        if isinstance(tool, Qnx):
            lat = status_latencies(tool, args.status_calls, tool.status_maps_call)
            out["status_maps_p50"], out["status_maps_p99"] = pct(lat, 0.5), pct(lat, 0.99)
        lat = status_under_load(tool, args.status_calls)
        out["status_load_p50"], out["status_load_p99"] = pct(lat, 0.5), pct(lat, 0.99)
        try:
            pings, decode = tool.status_floor(args.status_calls)
        except Skip:
            pass
        else:
            out["ping_p50"], out["status_decode"] = pct(pings, 0.5), decode

        kills = min(args.kills, tool.max_kills)
        restarts = restart_times(tool, kills)
        out["restart_p50"], out["restart_p95"] = pct(restarts, 0.5), pct(restarts, 0.95)
        try:
            tool.start_extra("crashloop")
        except Skip:
            pass
        else:
            time.sleep(1.0)  # a few crashes into the loop
            restarts = restart_times(tool, kills, offset=kills)
            tool.stop_extra("crashloop")
            out["restart_loop_p50"] = pct(restarts, 0.5)
            out["restart_loop_p95"] = pct(restarts, 0.95)
        if args.churn:
            churn(tool, out, args.churn)

        pids = [p for _, p in tool.states().values() if p]
        fds = open_pidfds(pids)
        t0 = time.perf_counter()
        tool.shutdown()
        wait_pidfds(fds, 300)
        out["stop_workers"] = time.perf_counter() - t0
        assert tool.proc is not None
        wait_exit(tool.proc, 300)
        out["stop_all"] = time.perf_counter() - t0
        leftovers = [p for p in pids if alive(p)]
        if leftovers:
            raise RuntimeError(f"{tool.label}: workers left after shutdown: {leftovers}")
    finally:
        tool.close()
    return out


def floor(count: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """The same spawns with nothing in between: Popen with the settings workers get."""
    times = []
    for _ in range(rounds):
        fds = [
            os.open(workdir / f"floor-{i}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            for i in range(count)
        ]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                COMMAND,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                close_fds=True,
                start_new_session=True,
            )
            for fd in fds
        ]
        times.append(time.perf_counter() - t0)
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        for fd in fds:
            os.close(fd)
        time.sleep(0.2)
    return {"tool": "subprocess.Popen (floor)", "start_best": min(times), "start_first": times[0]}


def run_tool(name: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    runs = iter(range(1_000_000))

    def fresh() -> Path:
        # Each daemon launched gets a directory of its own (s6 wants an empty scan dir).
        d = workdir / str(next(runs))
        d.mkdir()
        return d

    try:
        if name == "floor":
            return floor(count, args.rounds, workdir)
        if name.startswith("qnx-"):
            backend = name.split("-", 1)[1]
            if backend == "cgroup1":
                from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend

                why = Cgroup1Backend.probe()
                if why is not None:
                    raise Skip(f"cgroup1 unavailable: {why}")
            return measure(lambda: Qnx(count, fresh(), backend), args)
        if name == "supervisord":
            return measure(lambda: Supervisord(count, fresh()), args)
        if name == "s6":
            return measure(lambda: S6(count, fresh()), args)
        if name == "circus":
            if not _in_compare_venv():
                return _circus_via_compare_venv(count, args)
            return measure(lambda: Circus(count, fresh()), args)
        raise ValueError(name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _in_compare_venv() -> bool:
    return Path(sys.prefix).resolve() == COMPARE_VENV.resolve()


def _circus_via_compare_venv(count: int, args: argparse.Namespace) -> dict[str, Any]:
    python = COMPARE_VENV / "bin" / "python"
    if not python.exists():
        raise Skip(f"{python} missing (make bench-deps)")
    argv = [str(python), __file__, "--only", "circus", "--json", "--count", str(count)]
    argv += ["--rounds", str(args.rounds), "--kills", str(args.kills)]
    argv += ["--status-calls", str(args.status_calls), "--idle", str(args.idle)]
    argv += ["--launch-rounds", str(args.launch_rounds), "--churn", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise Skip(f"circus run failed: {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    if data["skipped"]:
        raise Skip(data["skipped"][0]["reason"])
    return dict(data["results"][0])


def hammer(target: str) -> int:
    """Call status back to back until killed (one of the clients of ``status_under_load``)."""
    kind, _, where = target.partition(":")
    call: Callable[[], object]
    if kind == "qnx":
        from supervisord_qnx.control.client import Client

        client = Client(Path(where), timeout=60)
        call = lambda: client.call("status", table=True)  # noqa: E731
    elif kind == "supervisord":
        rpc: Any = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(where))
        call = rpc.supervisor.getAllProcessInfo
    elif kind == "circus":
        from circus.client import CircusClient

        cc = CircusClient(endpoint=where, timeout=60)
        call = lambda: cc.call({"command": "status", "properties": {}})  # noqa: E731
    elif kind == "s6":
        names = sorted(n for n in os.listdir(where) if not n.startswith("."))  # .s6-svscan
        call = lambda: [(Path(where) / n / "supervise" / "status").read_bytes() for n in names]  # noqa: E731
    else:
        raise ValueError(target)
    while True:
        call()


# --------------------------------------------------------------------------- report

ROWS: list[tuple[str, str, float, str]] = [
    # key, label, scale, unit
    ("launch_best", "launch → all running: best", 1e3, "ms"),
    ("launch_first", "launch → all running: first", 1e3, "ms"),
    ("start_best", "start N: best", 1e3, "ms"),
    ("start_first", "start N: first round", 1e3, "ms"),
    ("restart_p50", "restart after SIGKILL p50", 1e3, "ms"),
    ("restart_p95", "restart after SIGKILL p95", 1e3, "ms"),
    ("restart_loop_p50", "restart, crash loop beside, p50", 1e3, "ms"),
    ("restart_loop_p95", "restart, crash loop beside, p95", 1e3, "ms"),
    ("status_p50", "status at N p50", 1e3, "ms"),
    ("status_p99", "status at N p99", 1e3, "ms"),
    ("status_maps_p50", "status at N p50, list of maps", 1e3, "ms"),
    ("status_maps_p99", "status at N p99, list of maps", 1e3, "ms"),
    ("status_load_p50", f"status, {HAMMERS} clients hammer, p50", 1e3, "ms"),
    ("status_load_p99", f"status, {HAMMERS} clients hammer, p99", 1e3, "ms"),
    ("ping_p50", "ping p50 (a call's floor)", 1e3, "ms"),
    ("status_decode", "status reply, client's decode", 1e3, "ms"),
    ("stop_workers", "stop all (shutdown → workers gone)", 1e3, "ms"),
    ("stop_all", "stop all (shutdown → daemon exit)", 1e3, "ms"),
    ("rss_idle", "RSS, N configured, none running", 1 / 2**20, "MiB"),
    ("rss_running", "RSS, N running", 1 / 2**20, "MiB"),
    ("rss_per_worker", "RSS per running worker", 1 / 2**10, "KiB"),
    ("rss_daemon_running", "RSS of the daemon process alone", 1 / 2**20, "MiB"),
    ("rss_daemon_settled", "RSS of the daemon, N running, 11 s later", 1 / 2**20, "MiB"),
    ("rss_daemon_idle", "RSS of the daemon, none running", 1 / 2**20, "MiB"),
    ("rss_daemon_per_worker", "RSS of the daemon per running worker", 1 / 2**10, "KiB"),
    ("pss_running", "PSS, N running", 1 / 2**20, "MiB"),
    ("idle_cpu_pct", "idle CPU with N running", 1, "%"),
    ("rss_after_churn", "RSS after the churn restarts", 1 / 2**20, "MiB"),
    ("churn_growth", "RSS growth over the churn", 1 / 2**10, "KiB"),
]

# Ratios printed for each supervisord-qnx column against each peer and the floor.
RATIO_KEYS = (
    "launch_best",
    "start_best",
    "restart_p50",
    "status_p50",
    "stop_workers",
    "stop_all",
    "rss_running",
)


def print_table(results: list[dict[str, Any]], skipped: list[dict[str, str]], count: int) -> None:
    cols = [r["tool"] for r in results]
    width = max(14, *(len(c) for c in cols))
    print(f"\nN = {count} workers ({' '.join(COMMAND)}), {time.strftime('%Y-%m-%d')}")
    print(f"{'':<40}" + "".join(f"{c:>{width + 2}}" for c in cols))
    for key, label, scale, unit in ROWS:
        cells = []
        for r in results:
            v = r.get(key)
            cells.append("-" if v is None else f"{v * scale:.{_digits(v * scale)}f}")
        if any(c != "-" for c in cells):
            print(f"{label + ' (' + unit + ')':<40}" + "".join(f"{c:>{width + 2}}" for c in cells))
    ratios = _ratios(results)
    if ratios:
        print(f"\nratios, ours / theirs (same run; {', '.join(RATIO_KEYS)}):")
        for line in ratios:
            print(f"  {line}")
    for s in skipped:
        print(f"skipped {s['tool']}: {s['reason']}")


def print_slopes(tables: list[dict[str, Any]]) -> None:
    """The daemon process's RSS with N running, between the smallest and largest N of the
    run, per worker added: what one more running worker costs it, without what it holds
    whatever N is (its bounded event history and finished jobs fill up at any N, and
    the spawn threads of a start come and go), which the per-N figure counts in."""
    if len(tables) < 2:
        return
    low, high = min(tables, key=lambda t: t["count"]), max(tables, key=lambda t: t["count"])
    for r in high["results"]:
        other = next((o for o in low["results"] if o["tool"] == r["tool"]), None)
        if other is None or "rss_daemon_running" not in r or "rss_daemon_running" not in other:
            continue
        slope = (r["rss_daemon_running"] - other["rss_daemon_running"]) / (
            high["count"] - low["count"]
        )
        print(
            f"daemon process RSS per running worker, N = {low['count']} → {high['count']}, "
            f"{r['tool']}: {slope / 2**10:.1f} KiB"
        )


def _digits(v: float) -> int:
    return 3 if abs(v) < 1 else 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0


def _ratios(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    others = [r for r in results if not r["tool"].startswith("supervisord-qnx")]
    for r in results:
        if not r["tool"].startswith("supervisord-qnx"):
            continue
        for other in others:
            cells = []
            for key in RATIO_KEYS:
                theirs = other.get(key) or other.get("start_best" if key == "launch_best" else "")
                if r.get(key) is None or not theirs:
                    continue
                cells.append(f"{key} {r[key] / theirs:.2f}")
            if cells:
                lines.append(f"{r['tool']} / {other['tool']}: " + ", ".join(cells))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        epilog="The floor's launch figure is its start figure (N Popen calls).",
    )
    ap.add_argument(
        "--count", type=int, nargs="+", default=[100, 1000], help="N (several: one table each)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="start rounds (best of)")
    ap.add_argument("--launch-rounds", type=int, default=2, help="daemon launches (best of)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--status-calls", type=int, default=500)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    ap.add_argument(
        "--churn",
        type=int,
        default=10_000,
        help="restarts of a worker that exits at once, for RSS growth (ours; 0: off)",
    )
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--hammer", metavar="TARGET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hammer:
        return hammer(args.hammer)
    tables = []
    for count in args.count:
        results: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for name in args.only:
            if not args.json:
                print(f"N={count}: measuring {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_tool(name, count, args))
            except Skip as exc:
                skipped.append({"tool": name, "reason": str(exc)})
            except Exception as exc:  # noqa: BLE001 - one tool's failure must not lose the others' figures
                skipped.append({"tool": name, "reason": f"failed: {type(exc).__name__}: {exc}"})
        tables.append({"count": count, "results": results, "skipped": skipped})
        if not args.json:
            print_table(results, skipped, count)
    if not args.json:
        print_slopes(tables)
    if args.json:
        if len(tables) == 1:
            print(json.dumps(tables[0]))
        else:
            print(json.dumps({"tables": tables}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
