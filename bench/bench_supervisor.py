"""supervisord-qnx against supervisord and circus, side by side on this machine.

Every tool runs as its own daemon process from its own CLI, supervising the same N
single-process workers (``sleep 1000``), each with its own log file; supervisord-qnx gives
each worker its own tenant (= partition). Measured, for each tool:

* **start N**: the daemon is up with every worker configured but not started; the clock
  runs from the first "start" request to the first status reply in which all N are
  running (polled every 10 ms over the tool's own control socket). Best of ``--rounds``.
  The floor is the same N spawns done with plain ``subprocess.Popen`` in this process.
* **restart after SIGKILL**: kill one worker's process; the clock runs until status shows
  a new pid running (polled back to back). p50/p95 over ``--kills`` kills.
* **status**: one full status call at N workers, p50/p95 over ``--status-calls`` calls on
  one connection (supervisord-qnx: the blocking ``Client``; supervisord: XML-RPC
  ``getAllProcessInfo``; circus: the ``status`` command).
* **RSS**: the daemon's resident size with N configured and none running, with N running,
  and the difference per worker.
* **idle CPU**: the daemon's user + system CPU over ``--idle`` seconds with N running,
  from ``/proc/<pid>/stat``, as a percent of one CPU.
* **stop all**: from the shutdown request until the daemon process has exited (every
  worker stopped and, for supervisord-qnx, every partition removed).

supervisord and circus run from a separate virtualenv, ``bench/.venv-compare`` (never the
project's): create it with

    python3 -m venv bench/.venv-compare
    bench/.venv-compare/bin/pip install supervisor circus

Circus needs pyzmq for its client, so its figures are taken by this same script run under
the compare venv's interpreter (``--only circus --json``) and merged. Without the venv,
those columns are skipped with the reason printed.

    .venv/bin/python bench/bench_supervisor.py [--count 100] [--json] [--only TOOL ...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
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
TOOLS = ("qnx-portable", "qnx-cgroup1", "floor", "supervisord", "circus")


class Skip(Exception):
    """This tool cannot be measured here; ``str()`` says why."""


# --------------------------------------------------------------------------- /proc figures


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
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
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "log").mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> None:
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

    def launch(self) -> None:
        from supervisord_qnx.control.client import Client

        tenants = self.dir / "tenants.d"
        tenants.mkdir(exist_ok=True)
        template = (COMPARE / "tenant.toml.in").read_text()
        for name in self.names:
            (tenants / f"{name}.toml").write_text(
                template.format(name=name, autostart="false", command=json.dumps(COMMAND))
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

    def start_all(self) -> None:
        for name in self.names:
            self.client.call("start", tenant=name)

    def stop_all(self) -> None:
        for name in self.names:
            self.client.call("stop", tenant=name, wait=False)

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {w["tenant"]: (w["state"], w["pid"]) for w in self.client.call("status")}

    def worker(self, name: str) -> tuple[str, int | None]:
        w = self.client.call("status", tenant=name)[0]
        return w["state"], w["pid"]

    def status_call(self) -> None:
        self.client.call("status")

    def shutdown(self) -> None:
        self.client.call("shutdown")
        self.client.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        super().close()
        self.socket.unlink(missing_ok=True)


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

    def launch(self) -> None:
        binary = COMPARE_VENV / "bin" / "supervisord"
        if not binary.exists():
            raise Skip(f"{binary} missing (pip install supervisor into {COMPARE_VENV})")
        text = (COMPARE / "supervisord.conf.in").read_text().format(dir=self.dir)
        program = (COMPARE / "supervisord-program.conf.in").read_text()
        for name in self.names:
            text += program.format(
                name=name, dir=self.dir, autostart="false", command=" ".join(COMMAND)
            )
        # One group for all: supervisord stops groups one after another, waiting for each
        # (a program outside any group is its own group), which made its shutdown take
        # ~0.8 s per worker; a group stops its programs together.
        text += f"\n[group:all]\nprograms = {','.join(self.names)}\n"
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
        self.rpc.supervisor.startAllProcesses(False)

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(False)

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {
            p["name"]: ("running" if p["statename"] == "RUNNING" else p["statename"], p["pid"])
            for p in self.rpc.supervisor.getAllProcessInfo()
        }

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

    def launch(self) -> None:
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
        wait_for(lambda: all_running(self), 120, "circus: autostart done")
        self.stop_all()
        wait_for(lambda: none_running(self), 120, "circus: all stopped")

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


# --------------------------------------------------------------------------- measurements


def all_running(tool: Tool) -> bool:
    states = tool.states()
    return len(states) == tool.count and all(s == "running" for s, _ in states.values())


def none_running(tool: Tool) -> bool:
    return all(s != "running" for s, _ in tool.states().values())


def measure(tool: Tool, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"tool": tool.label}
    tool.launch()
    try:
        time.sleep(0.5)  # let start-up work (imports, partition creation) settle
        out["rss_idle"] = rss_bytes(tool.pid)
        starts = []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            tool.start_all()
            wait_for(lambda: all_running(tool), 120, f"{tool.label}: all running")
            starts.append(time.perf_counter() - t0)
            if r < args.rounds - 1:
                tool.stop_all()
                wait_for(lambda: none_running(tool), 120, f"{tool.label}: all stopped")
                time.sleep(0.2)
        out["start_best"] = min(starts)
        out["start_first"] = starts[0]
        time.sleep(0.5)
        out["rss_running"] = rss_bytes(tool.pid)
        out["rss_per_worker"] = (out["rss_running"] - out["rss_idle"]) / tool.count

        c0, t0 = cpu_seconds(tool.pid), time.monotonic()
        time.sleep(args.idle)
        out["idle_cpu_pct"] = 100 * (cpu_seconds(tool.pid) - c0) / (time.monotonic() - t0)

        lat = []
        for _ in range(args.status_calls):
            t0 = time.perf_counter()
            tool.status_call()
            lat.append(time.perf_counter() - t0)
        out["status_p50"], out["status_p95"] = pct(lat, 0.5), pct(lat, 0.95)

        restarts = []
        for i in range(min(args.kills, tool.max_kills)):
            name = tool.names[i % tool.count]
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
        out["restart_p50"], out["restart_p95"] = pct(restarts, 0.5), pct(restarts, 0.95)

        pids = [p for _, p in tool.states().values() if p]
        t0 = time.perf_counter()
        tool.shutdown()
        assert tool.proc is not None
        tool.proc.wait(120)
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


def run_tool(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        if name == "floor":
            return floor(args.count, args.rounds, workdir)
        if name.startswith("qnx-"):
            backend = name.split("-", 1)[1]
            if backend == "cgroup1":
                from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend

                why = Cgroup1Backend.probe()
                if why is not None:
                    raise Skip(f"cgroup1 unavailable: {why}")
            return measure(Qnx(args.count, workdir, backend), args)
        if name == "supervisord":
            return measure(Supervisord(args.count, workdir), args)
        if name == "circus":
            if not _in_compare_venv():
                return _circus_via_compare_venv(args)
            return measure(Circus(args.count, workdir), args)
        raise ValueError(name)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _in_compare_venv() -> bool:
    return Path(sys.prefix).resolve() == COMPARE_VENV.resolve()


def _circus_via_compare_venv(args: argparse.Namespace) -> dict[str, Any]:
    python = COMPARE_VENV / "bin" / "python"
    if not python.exists():
        raise Skip(f"{python} missing (pip install circus into {COMPARE_VENV})")
    argv = [str(python), __file__, "--only", "circus", "--json", "--count", str(args.count)]
    argv += ["--rounds", str(args.rounds), "--kills", str(args.kills)]
    argv += ["--status-calls", str(args.status_calls), "--idle", str(args.idle)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise Skip(f"circus run failed: {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    if data["skipped"]:
        raise Skip(data["skipped"][0]["reason"])
    return dict(data["results"][0])


# --------------------------------------------------------------------------- report

ROWS: list[tuple[str, str, float, str]] = [
    # key, label, scale, unit
    ("start_best", "start N: best", 1e3, "ms"),
    ("start_first", "start N: first round", 1e3, "ms"),
    ("restart_p50", "restart after SIGKILL p50", 1e3, "ms"),
    ("restart_p95", "restart after SIGKILL p95", 1e3, "ms"),
    ("status_p50", "status at N p50", 1e3, "ms"),
    ("status_p95", "status at N p95", 1e3, "ms"),
    ("stop_all", "stop all (shutdown → exit)", 1e3, "ms"),
    ("rss_idle", "RSS, N configured, none running", 1 / 2**20, "MiB"),
    ("rss_running", "RSS, N running", 1 / 2**20, "MiB"),
    ("rss_per_worker", "RSS per running worker", 1 / 2**10, "KiB"),
    ("idle_cpu_pct", "idle CPU with N running", 1, "%"),
]


def print_table(results: list[dict[str, Any]], skipped: list[dict[str, str]], count: int) -> None:
    cols = [r["tool"] for r in results]
    width = max(14, *(len(c) for c in cols))
    print(f"N = {count} workers ({' '.join(COMMAND)}), {time.strftime('%Y-%m-%d')}")
    print(f"{'':<34}" + "".join(f"{c:>{width + 2}}" for c in cols))
    for key, label, scale, unit in ROWS:
        cells = []
        for r in results:
            v = r.get(key)
            cells.append("-" if v is None else f"{v * scale:.{_digits(v * scale)}f}")
        if any(c != "-" for c in cells):
            print(f"{label + ' (' + unit + ')':<34}" + "".join(f"{c:>{width + 2}}" for c in cells))
    ratios = _ratios(results)
    if ratios:
        print("\nratios (start N best; restart p50; status p50):")
        for line in ratios:
            print(f"  {line}")
    for s in skipped:
        print(f"skipped {s['tool']}: {s['reason']}")


def _digits(v: float) -> int:
    return 3 if abs(v) < 1 else 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0


def _ratios(results: list[dict[str, Any]]) -> list[str]:
    by = {r["tool"]: r for r in results}
    lines = []
    floor_r = by.get("subprocess.Popen (floor)")
    sup = by.get("supervisord")
    for r in results:
        if not r["tool"].startswith("supervisord-qnx"):
            continue
        if floor_r:
            lines.append(
                f"{r['tool']} start / floor = {r['start_best'] / floor_r['start_best']:.2f}"
            )
        for other in (sup, by.get("circus")):
            if other is None:
                continue
            for key in ("start_best", "restart_p50", "status_p50"):
                lines.append(f"{r['tool']} {key} / {other['tool']} = {r[key] / other[key]:.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="start rounds (best of)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--status-calls", type=int, default=200)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    ap.add_argument("--only", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for name in args.only:
        if not args.json:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_tool(name, args))
        except Skip as exc:
            skipped.append({"tool": name, "reason": str(exc)})
    if args.json:
        print(json.dumps({"count": args.count, "results": results, "skipped": skipped}))
    else:
        print_table(results, skipped, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
