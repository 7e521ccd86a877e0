"""The chaos soak: the real daemon (a subprocess, cgroup v1 under a unique root) for
``--soak-seconds`` (60 s in CI) while 8 clients issue random start/stop/restart/status/
reload/set/run/logs calls, a killer SIGKILLs workers, a tenant allocates until its
partition's memory limit kills it, one fork-bombs against its pids limit, one floods
stdout through a rotating log, and one subscriber never reads its events.

Afterwards, what a user would check: no zombie children of the daemon, no partition
directory or descriptor the daemon did not have before the chaos, every tenant in the
state last asked for, the daemon's RSS within 10 % of its size after warm-up, ``status``
answered quickly throughout, and in every worker's log only whole numbered lines, each
run's numbers without a gap (a run ends where it was killed or stopped).

The figures are printed at the end (run with ``-s``) and belong in docs/reliability.md.
To extend: add an operation to ``Chaos.OPS`` (name, weight, method), a tenant to
``write_config``, or a check after ``settle``."""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import textwrap
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from supervisord_qnx.control.client import AsyncClient, Client
from supervisord_qnx.control.rpc import ErrorCode, RpcError
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, worker_py
from tests.daemonproc import DaemonProc
from tests.test_storm import zombies_of

pytestmark = pytest.mark.soak

# Daemon RSS growth allowed from warm-up to the end (issue 13; see the assertion).
RSS_GROWTH_BOUND = 0.10
# The daemon's own share of a status call (dispatch to result, its histogram), asserted
# as "at least 99 % within this bucket". The goal is 50 ms, met in 4 of 6 runs
# at load 19 to 60 (99.36 to 99.71 %) and missed in two (98.96 % at load 26): status
# never yields to other tasks, so a slow one is the daemon's thread not running (the
# machine's load). 100 ms held in every run, load 19 to 60 (99.8 % and more); see
# docs/reliability.md, "status latency".
STATUS_DAEMON_P99 = 0.1

CLIENTS = 8
# A call not answered in this long is a hang (a finding), whatever the machine's load.
HANG = 60
# The tenants the clients start, stop and restart and the killer kills: numbered-line
# writers (NUMBERED) and the fork bomb. The flood is left alone, so that its log shows one
# long run through many rotations, and the memory bomb, so that it keeps hitting its limit.
NUMBERED = ("num0", "num1", "num2", "num3")
TARGETS = (*NUMBERED, "forkbomb")
# Numbered lines: "L <pid> <seq> <padding> <crc32 of the three before>", each written
# with one write(2), so a line is whole unless something between the worker and the file
# tears it.
LINE = re.compile(r"^L (\d+) (\d+) (x*) ([0-9a-f]{8})$")
NUMBERED_WORKER = worker_py(
    "import os, sys, time, zlib\n"
    "pid, n, pad = os.getpid(), 0, 'x' * (os.getpid() % 40)\n"
    "delay = float(sys.argv[1]) if len(sys.argv) > 1 else 0.01\n"
    "while True:\n"
    "    n += 1\n"
    "    body = f'{pid} {n} {pad}'\n"
    "    os.write(1, f'L {body} {zlib.crc32(body.encode()):08x}\\n'.encode())\n"
    "    if delay: time.sleep(delay)\n"
)
MEMBOMB = worker_py(
    "import time\nhoard = []\nwhile True:\n    hoard.append(bytearray(4 << 20)); time.sleep(0.02)\n"
)
FORKBOMB = worker_py(
    "import os, time\n"
    "while True:\n"
    "    try:\n"
    "        if os.fork() == 0: continue\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.05)\n"
)


def numbered_tenant(name: str, generation: int, memory: str, instances: int) -> str:
    return f"""
        memory = {{ max = "{memory}" }}
        cpu = {{ max = 25 }}
        restart = {{ policy = "always", backoff_initial = 0.05, backoff_max = 0.5, max_restarts = 1000000, window = 1 }}
        log = {{ max_size = "64MiB", keep = 2 }}
        [[worker]]
        name = "w"
        instances = {instances}
        stop_timeout = 2
        env = {{ GENERATION = "{generation}" }}
        command = {NUMBERED_WORKER}
        """  # noqa: E501


def write_config(cfg: ConfigDir, cg: CgroupRoot) -> None:
    cfg.partitions += textwrap.dedent(
        """
        [[partition]]
        name = "jobs"
        memory = { max = "256MiB" }
        pids = 64
        """
    )
    for i, name in enumerate(NUMBERED):
        cfg.tenant(name, numbered_tenant(name, 0, "96MiB", 2 if i == 0 else 1))
    cfg.tenant(
        "membomb",
        f"""
        memory = {{ max = "48MiB" }}
        cpu = {{ max = 20 }}
        restart = {{ policy = "always", backoff_initial = 0.3, backoff_max = 1, max_restarts = 1000000, window = 1 }}
        [[worker]]
        name = "w"
        command = {MEMBOMB}
        """,  # noqa: E501
    )
    cfg.tenant(
        "forkbomb",
        f"""
        memory = {{ max = "256MiB" }}
        cpu = {{ max = 10 }}
        pids = 16
        [[worker]]
        name = "w"
        stop_timeout = 2
        command = {FORKBOMB}
        """,
    )
    flood = NUMBERED_WORKER[:-1] + ', "0"]'  # no pause between lines
    cfg.tenant(
        "flood",
        f"""
        memory = {{ max = "96MiB" }}
        cpu = {{ max = 20 }}
        log = {{ max_size = "1MiB", keep = 2 }}
        [[worker]]
        name = "w"
        command = {flood}
        """,
    )
    cfg.write(backend="cgroup1", cgroup_root=cg.name)


# -- what the daemon looks like from outside


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status_buckets(client: Client) -> dict[str, float]:
    """The daemon's histogram of its ``status`` calls (dispatch to result): cumulative
    count per upper bound ("0.05", ..., "+Inf"), from the ``metrics`` method."""
    text = client.call("metrics")
    found = re.findall(
        r'^supervisord_qnx_control_request_duration_seconds_bucket\{(?=[^}]*method="status")'
        r'[^}]*le="([^"]+)"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return {le: float(n) for le, n in found}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ours(pid: int, cg: CgroupRoot) -> bool:
    """The pid is still in this test's cgroup root (not reused by anyone else's process)."""
    try:
        return cg.name in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


# -- load


class Prober:
    """``status`` every 50 ms on its own connection, from a thread (so that the chaos
    clients' trio tasks never delay it): the latency a monitoring client sees."""

    def __init__(self, path: Path) -> None:
        self.client = Client(path, timeout=30)
        self.samples: list[tuple[float, float]] = []  # (monotonic time, latency)
        # How late a 1 ms sleep of this thread wakes up: the machine's own scheduling
        # delay, beside which the status latency is to be read.
        self.oversleep: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.client.call("status")
                self.samples.append((began, time.monotonic() - began))
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(repr(exc))
            began = time.monotonic()
            time.sleep(0.001)
            self.oversleep.append(time.monotonic() - began - 0.001)
            self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.client.close()


class DeafSubscriber:
    """Subscribes to every event and never reads: the daemon must drop it (queue overflow
    or write timeout) without anyone else noticing."""

    def __init__(self, path: Path) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(str(path))
        self.sock.sendall(msgpack.packb([0, 1, "subscribe", []]))

    def dropped(self) -> bool:
        """Read what is queued; True if the daemon closed the connection."""
        self.sock.settimeout(5)
        try:
            while self.sock.recv(1 << 20):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    status_latency: list[float] = field(default_factory=list)
    kills: int = 0
    reloads: int = 0
    # Seen by a subscriber that reads every event: kinds, and exit reasons of runs.
    events: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    forkbomb_tasks: list[int] = field(default_factory=list)  # its partition's pids.current
    # (method, began, ended) of every call, to see what ran while status was slow.
    spans: list[tuple[str, float, float]] = field(default_factory=list)


class Chaos:
    """The 8 clients and the killer. Start/stop/restart of one tenant are serialized by
    a lock per tenant, so that "the state last asked for" is well defined; everything else
    (reload, set, run, status, logs, kills) runs concurrently with them."""

    def __init__(self, d: DaemonProc, cfg: ConfigDir, cg: CgroupRoot, seed: int) -> None:
        self.d, self.cfg, self.cg, self.seed = d, cfg, cg, seed
        self.tally = Tally()
        self.intent = dict.fromkeys(TARGETS, "running")
        self.intent["membomb"] = "running"  # never asked otherwise
        self.locks = {t: trio.Lock() for t in TARGETS}
        self.edit_lock = trio.Lock()
        self.generation = 0
        self.instances = 2
        self.OPS = [
            (30, self.status),
            (30, self.lifecycle),
            (6, self.reload),
            (8, self.set_limits),
            (8, self.run_job),
            (6, self.logs),
            (4, self.partitions),
            (4, self.events),
            (2, self.metrics),
        ]

    async def call(self, c: AsyncClient, method: str, **params: Any) -> Any:
        self.tally.calls[method] += 1
        began = time.monotonic()
        try:
            with trio.fail_after(HANG):
                return await c.call(method, **params)
        except trio.TooSlowError:
            self.problem(f"{method} {params}: no answer in {HANG} s (from {began:.1f})")
            raise
        finally:
            self.tally.spans.append((method, began, time.monotonic()))

    def problem(self, what: str) -> None:
        self.tally.problems.append(what)

    async def status(self, c: AsyncClient, rng: random.Random) -> None:
        params = {"tenant": rng.choice(TARGETS)} if rng.random() < 0.3 else {}
        began = time.monotonic()
        await self.call(c, "status", **params)
        self.tally.status_latency.append(time.monotonic() - began)

    async def lifecycle(self, c: AsyncClient, rng: random.Random) -> None:
        tenant = rng.choice(TARGETS)
        method = rng.choice(("start", "stop", "restart"))
        params: dict[str, Any] = {"tenant": tenant}
        if rng.random() < 0.5:
            params["wait"] = rng.random() < 0.5
        async with self.locks[tenant]:
            try:
                await self.call(c, method, **params)
            except RpcError as exc:
                # start of a running tenant, stop of a stopped one: the state asked for
                # holds anyway.
                if exc.code != ErrorCode.INVALID_STATE:
                    raise
                self.tally.errors[f"{method}:{exc.code}"] += 1
            self.intent[tenant] = "stopped" if method == "stop" else "running"

    async def reload(self, c: AsyncClient, rng: random.Random) -> None:
        """Edit a tenant file (a new environment, which restarts the tenant's workers if
        they run; a new memory max, resized in place; num0's instance count), reload, and
        check the answer."""
        async with self.edit_lock:
            self.generation += 1
            tenant = rng.choice(NUMBERED)
            if tenant == "num0" and rng.random() < 0.5:
                self.instances = 3 - self.instances
            memory = rng.choice(("96MiB", "128MiB"))
            instances = self.instances if tenant == "num0" else 1
            self.cfg.tenant(tenant, numbered_tenant(tenant, self.generation, memory, instances))
            reply = await self.call(c, "reload")
            self.tally.reloads += 1
            if reply["failed"]:
                self.problem(f"reload failed: {reply['failed']}")

    async def set_limits(self, c: AsyncClient, rng: random.Random) -> None:
        tenant = rng.choice(NUMBERED)
        try:
            if rng.random() < 0.5:
                await self.call(c, "set", partition=f"tenants/{tenant}", pids=rng.randint(32, 64))
            else:
                mem = rng.choice(("64MiB", "96MiB"))
                await self.call(c, "set", partition=f"tenants/{tenant}", memory={"max": mem})
        except RpcError as exc:
            # The kernel may refuse a memory max below the usage (EBUSY): a fair answer.
            if exc.code != ErrorCode.BACKEND_ERROR:
                raise
            self.tally.errors[f"set:{exc.code}"] += 1

    async def run_job(self, c: AsyncClient, rng: random.Random) -> None:
        reply = await self.call(
            c,
            "run",
            partition="jobs",
            command=["sh", "-c", "echo job $SUPERVISORD_QNX_JOB; sleep 0.2"],
            memory="32MiB",
            timeout=10,
            wait=rng.random() < 0.3,
        )
        if reply["done"] and reply["exit_reason"] != "exit:0":
            self.problem(f"job ended {reply['exit_reason']}")

    async def logs(self, c: AsyncClient, rng: random.Random) -> None:
        await self.call(c, "logs", tenant=rng.choice((*NUMBERED, "flood")), lines=20)

    async def partitions(self, c: AsyncClient, _rng: random.Random) -> None:
        await self.call(c, "partitions")

    async def events(self, c: AsyncClient, _rng: random.Random) -> None:
        await self.call(c, "events", limit=50)

    async def metrics(self, c: AsyncClient, _rng: random.Random) -> None:
        await self.call(c, "metrics")

    async def client(self, n: int, until: float) -> None:
        rng = random.Random(self.seed * 100 + n)
        weights = [w for w, _ in self.OPS]
        while time.monotonic() < until:
            try:
                async with AsyncClient(self.cfg.socket) as c:
                    for _ in range(rng.randint(5, 40)):
                        if time.monotonic() >= until:
                            break
                        op = rng.choices(self.OPS, weights)[0][1]
                        try:
                            await op(c, rng)
                        except RpcError as exc:
                            self.problem(f"{op.__name__}: {exc!r}")
                        await trio.sleep(rng.random() * 0.1)
            except* OSError as group:
                self.problem(f"client {n}: {group.exceptions!r}")
            except* trio.TooSlowError:
                pass  # recorded by call(); a new connection goes on

    async def listen(self, until: float) -> None:
        """A subscriber that keeps up, beside the deaf one: counts what the daemon says
        happened (restarts by policy, OOM kills, exits by reason)."""
        async with AsyncClient(self.cfg.socket) as c:
            await c.subscribe()
            with trio.move_on_after(until - time.monotonic()):
                async for event in c.stream():
                    self.tally.events[event["kind"]] += 1
                    # A run ended: from a live state into one without a process.
                    ended = event.get("old") in ("starting", "running", "stopping") and event.get(
                        "new"
                    ) in ("backoff", "exited", "fatal", "stopped")
                    if event["kind"] == "state" and ended:
                        self.tally.exits[str(event["exit_reason"]).split(" (")[0]] += 1

    async def killer(self, until: float) -> None:
        rng = random.Random(self.seed)
        async with AsyncClient(self.cfg.socket) as c:
            while time.monotonic() < until:
                running = [
                    w
                    for w in await c.call("status")
                    if w["tenant"] in TARGETS and w["state"] == "running" and w["pid"]
                ]
                if running:
                    pid = rng.choice(running)["pid"]
                    if ours(pid, self.cg):  # a worker the daemon started for this test
                        try:
                            os.kill(pid, signal.SIGKILL)
                            self.tally.kills += 1
                        except ProcessLookupError:
                            pass
                self.sample_forkbomb()
                await trio.sleep(rng.uniform(0.1, 0.5))

    def sample_forkbomb(self) -> None:
        try:
            current = self.cg.dir("pids", "tenants", "forkbomb", "pids.current").read_text()
        except OSError:
            return  # between a stop and a start of its partition's leaf: nothing to count
        self.tally.forkbomb_tasks.append(int(current))


# -- checks


def check_numbered_log(files: list[Path], *, rotated: bool) -> tuple[int, list[str]]:
    """Lines and problems of one instance's log files (oldest first). Each line is a whole
    numbered line; each run (pid) is one block whose numbers go up by one from 1 (from
    wherever the oldest kept file starts, if older ones were rotated away); a run that
    ends may end anywhere (killed or stopped). A pid seen again from line 1 is a new run:
    pids wrap (pid_max 32768 here) and a 300 s run with the fork bomb beside other suites
    gave num2 two runs as pid 7759."""
    problems: list[str] = []
    seen: set[int] = set()
    current, last, lines = None, 0, 0
    for path in files:
        for raw in path.read_bytes().splitlines():
            lines += 1
            m = LINE.match(raw.decode("utf-8", "replace"))
            if m is None:
                problems.append(f"{path.name}: torn or foreign line {raw[:120]!r}")
                continue
            pid, seq, pad, crc = int(m[1]), int(m[2]), m[3], m[4]
            if f"{zlib.crc32(f'{pid} {seq} {pad}'.encode()):08x}" != crc:
                problems.append(f"{path.name}: line with a bad checksum {raw[:120]!r}")
            if pid != current:
                first_kept = rotated and current is None
                if seq == 1:
                    pass  # a new run; its pid may be an earlier run's, reused (see below)
                elif pid in seen:
                    problems.append(f"{path.name}: run {pid} resumes after another run")
                elif not first_kept:
                    problems.append(f"{path.name}: run {pid} starts at line {seq}")
                seen.add(pid)
                current, last = pid, seq
                continue
            if seq != last + 1:
                problems.append(f"{path.name}: run {pid} jumps from {last} to {seq}")
            last = seq
    return lines, problems


def instance_logs(cfg: ConfigDir, tenant: str) -> dict[str, list[Path]]:
    """Each instance's log files, oldest first."""
    out: dict[str, list[Path]] = {}
    for path in sorted((cfg.log_dir / "tenants" / tenant).glob("*.log*")):
        if path.name.endswith(".lock"):
            continue
        leaf = path.name.partition(".log")[0]
        out.setdefault(leaf, []).append(path)
    for paths in out.values():
        # x.log.2 (oldest) .. x.log.1, then x.log.
        paths.sort(key=lambda p: -int(p.name.rpartition(".")[2]) if p.suffix != ".log" else 0)
    return out


async def settle(d: DaemonProc, cfg: ConfigDir, intent: dict[str, str]) -> list[dict[str, Any]]:
    """Wait until every target is in the state last asked for; fail naming the ones not."""
    deadline = time.monotonic() + 30
    while True:
        with Client(cfg.socket, timeout=30) as c:
            status = c.call("status")
        wrong = [
            w for w in status if w["tenant"] in intent and not in_state(w, intent[w["tenant"]])
        ]
        if not wrong or time.monotonic() > deadline:
            assert wrong == [], f"not in the state last asked for: {wrong}"
            return list(status)
        await trio.sleep(0.2)


def in_state(w: dict[str, Any], asked: str) -> bool:
    if asked == "stopped":
        return w["state"] == "stopped" and w["pid"] is None
    if w["tenant"] == "membomb":  # killed at its limit again and again, by design
        return w["state"] in ("running", "starting", "backoff")
    return w["state"] == "running"


async def test_chaos_soak(cfg: ConfigDir, cg: CgroupRoot, soak_duration: float) -> None:
    write_config(cfg, cg)
    d = DaemonProc(cfg)
    try:
        await soak(d, cfg, cg, soak_duration)
    finally:
        if d.proc.poll() is None:
            d.stop()


async def soak(d: DaemonProc, cfg: ConfigDir, cg: CgroupRoot, duration: float) -> None:
    daemon_pid = d.proc.pid
    everything = dict.fromkeys((*TARGETS, "membomb"), "running")
    await settle(d, cfg, everything)
    prober = Prober(cfg.socket)
    deaf = DeafSubscriber(cfg.socket)
    await trio.sleep(1)
    fds_before = fd_count(daemon_pid)
    dirs_before = set(cg.leftovers())

    with Client(cfg.socket, timeout=30) as c:
        buckets_before = status_buckets(c)
    chaos = Chaos(d, cfg, cg, seed=int(os.environ.get("SUPERVISORD_QNX_SOAK_SEED", "13")))
    began = time.monotonic()
    until = began + duration
    # RSS after warm-up: half the run, at most a minute. The daemon's bounded memories
    # fill first (1000 events, the last 256 finished jobs: about 40 s at this rate; every
    # code path's first use); a 150 s run here grew 48 -> 53 MiB in its first 40 s, then
    # 53 -> 55 MiB, flat over its last minute.
    warm_at = began + min(max(10.0, duration / 2), 60.0)
    rss: dict[str, int] = {}

    curve: list[int] = []  # every 5 s, for the record

    async def sample_rss() -> None:
        with trio.move_on_after(until - time.monotonic()):
            while True:
                curve.append(rss_kib(daemon_pid))
                if "warm" not in rss and time.monotonic() >= warm_at:
                    rss["warm"] = curve[-1]
                await trio.sleep(5)

    async with trio.open_nursery() as n:
        n.start_soon(sample_rss)
        n.start_soon(chaos.killer, until)
        n.start_soon(chaos.listen, until)
        for i in range(CLIENTS):
            n.start_soon(chaos.client, i, until)
    elapsed = time.monotonic() - began
    with Client(cfg.socket, timeout=30) as c:
        buckets_after = status_buckets(c)

    tally = chaos.tally
    print(f"\nchaos took {time.monotonic() - began:.0f} s; daemon at {began:.1f}")
    assert d.proc.poll() is None, d.output()
    assert tally.problems == [], tally.problems[:20]

    # Every tenant as last asked; then everything back up as before the chaos, so that
    # descriptors and partition directories compare with the same tenants running.
    await settle(d, cfg, chaos.intent)
    with Client(cfg.socket, timeout=60) as c:
        for tenant, asked in chaos.intent.items():
            if asked == "stopped":
                c.call("start", tenant=tenant, wait=True)
        c.call("reload")  # the files as they are; drops every `set`
    await settle(d, cfg, everything)
    deaf_dropped = deaf.dropped()
    deaf.close()
    prober.close()

    # Jobs end within their timeout; then no zombie, no extra partition or descriptor.
    deadline = time.monotonic() + 30
    while True:
        with Client(cfg.socket, timeout=30) as c:
            jobs = c.call("status", tenant="job")
        zombies = zombies_of(daemon_pid)
        extra_dirs = sorted(set(cg.leftovers()) - dirs_before)
        fds_after = fd_count(daemon_pid)
        # The prober's and the deaf subscriber's connections are closed now: two fewer.
        settled = not jobs and not zombies and not extra_dirs and fds_after <= fds_before
        if settled or time.monotonic() > deadline:
            break
        await trio.sleep(0.2)
    rss["end"] = rss_kib(daemon_pid)

    # The logs are read once nothing writes them: a rotation of the flood's files between
    # reading one and the next would look like lost lines.
    with Client(cfg.socket, timeout=60) as c:
        for tenant in (*TARGETS, "membomb", "flood"):
            c.call("stop", tenant=tenant, wait=True)
    log_lines, log_problems = 0, []
    for tenant in (*NUMBERED, "flood"):
        for leaf, files in instance_logs(cfg, tenant).items():
            lines, problems = check_numbered_log(files, rotated=tenant == "flood")
            log_lines += lines
            log_problems += [f"{tenant}/{leaf}: {p}" for p in problems]

    lat = [s for _, s in prober.samples]
    windows = [
        [s for t, s in prober.samples if w <= t - began < w + 10]
        for w in range(0, int(elapsed), 10)
    ]
    window_p99 = [percentile(w, 0.99) for w in windows if len(w) >= 20]
    with Client(cfg.socket, timeout=30) as c:
        flood = c.call("status", tenant="flood")[0]
    # Never restarted: a tenant flooding its log is slowed by its pipe, not killed.
    assert flood["restarts"] == 0, flood
    growth = (rss["end"] - rss["warm"]) / rss["warm"]
    # The status calls of the chaos (prober and clients), as the daemon timed them.
    chaos_status = {le: n - buckets_before.get(le, 0.0) for le, n in buckets_after.items()}
    status_total = chaos_status["+Inf"]
    within = chaos_status[str(STATUS_DAEMON_P99)] / status_total
    within_50ms = chaos_status["0.05"] / status_total
    over_100ms = status_total - chaos_status["0.1"]
    slow = [(t, t + s) for t, s in prober.samples if s > 0.05]
    overlapping = Counter(m for a, b in slow for m, c, e in tally.spans if c < b and e > a)
    print(
        f"\nsoak: {elapsed:.0f} s, {sum(tally.calls.values())} calls {dict(tally.calls)}, "
        f"answered errors {dict(tally.errors)}, {tally.kills} SIGKILLs, {tally.reloads} "
        f"reloads; events {dict(tally.events)}; exits {dict(tally.exits.most_common(6))}; "
        f"flood restarts {flood['restarts']}; {log_lines} log lines checked; fork bomb tasks "
        f"max {max(tally.forkbomb_tasks)}\n"
        f"daemon RSS after warm-up {rss['warm']} KiB, at the end {rss['end']} KiB "
        f"({growth:+.1%}; every 5 s: {' '.join(str(r // 1024) for r in curve)} MiB); fds "
        f"{fds_before} -> {fds_after}; deaf subscriber dropped: "
        f"{deaf_dropped}\n"
        f"status latency (prober, {len(lat)} calls): p50 {statistics.median(lat) * 1e3:.1f} "
        f"ms, p99 {percentile(lat, 0.99) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms; worst "
        f"10 s window p99 {max(window_p99) * 1e3:.1f} ms; clients' status p99 "
        f"{percentile(tally.status_latency, 0.99) * 1e3:.1f} ms; the prober's 1 ms sleep woke "
        f"late by p99 {percentile(prober.oversleep, 0.99) * 1e3:.1f} ms, max "
        f"{max(prober.oversleep) * 1e3:.1f} ms (load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs); {len(slow)} prober calls over "
        f"50 ms, calls in flight then: {dict(overlapping.most_common(6))}\n"
        f"status in the daemon (dispatch to result, {status_total:.0f} calls): "
        f"{within_50ms:.2%} within 50 ms (the issue's goal), {over_100ms:.0f} over 100 ms"
    )
    assert prober.failures == []
    assert zombies == [], zombies
    assert extra_dirs == [], extra_dirs
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert log_problems == [], log_problems[:20]
    # Issue 13's figure. Measured +1 to +4 % (docs/reliability.md, "Where the daemon's
    # memory went"): 16 KiB kept per request gave +22 %, and the closed connections'
    # decoders held until a full GC gave +5 to +12 %.
    assert growth < RSS_GROWTH_BOUND, rss
    assert tally.kills > 0 and tally.reloads > 0
    # The bombs went off and were held: the memory bomb killed at its partition's limit,
    # the fork bomb at its pids limit (16) and no further.
    assert tally.exits["oom-killed"] + tally.exits["memory-limit"] > 0, tally.exits
    # pids.max holds forks only: a process moved into the cgroup is let in over it
    # (the kernel's cgroup-v1 pids documentation), and the previous run's last processes
    # stay charged until they are reaped. So a new worker started into the leaf as they
    # go can make 17, once (seen in 3 of 6 runs); more would be forks let through.
    assert 8 <= max(tally.forkbomb_tasks) <= 16 + 1, tally.forkbomb_tasks
    assert max(lat) < 5, "status took seconds: the daemon stopped answering"
    assert percentile(lat, 0.99) < P99_BOUND, "status p99 over the bound"
    # Issue 13's p99, for what the daemon itself spends on a status call: at least 99 %
    # of the chaos's status calls in the daemon's STATUS_DAEMON_P99 bucket.
    assert within >= 0.99, (chaos_status, status_total)
    assert "Traceback" not in d.output()


# The p99 is asserted on the daemon's own timing of status (STATUS_DAEMON_P99):
# what a client sees adds its own and the socket's scheduling, which the machine's load
# decides. On the shared 2-core machine at load averages of 20 to 30 the prober measured
# p99 259 and 505 ms while its own 1 ms sleep woke up to 35 ms late at p99 (and the
# daemon's own figure held 99.7 % within 50 ms at load 19 and 30). Here: only a bound that a
# daemon which stopped answering for a while would break; figures in docs/reliability.md.
P99_BOUND = 1.0
