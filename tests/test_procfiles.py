"""The portable sampler keeps its /proc files open between passes
(partition/procfiles.py): what it reads through them must stay as fresh as a read by path
(or a memory-limit kill would come late or never), and the descriptors must not outlive
the processes they name (or a long-running daemon would run out of them).

Real processes and the real backend; no daemon (the daemon-level memory-limit tests in
test_portable_sampling.py and test_daemon.py run through the same code)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisord_qnx.daemon import FDS_BASE, FDS_CONNECTIONS, FDS_PER_WORKER
from supervisord_qnx.partition.backend import BackendEvent, EventKind, SpawnRequest
from supervisord_qnx.partition.portable import PortableBackend
from supervisord_qnx.partition.procfiles import ProcFiles, ceiling_for
from supervisord_qnx.partition.tree import Partition

MiB = 1 << 20

# Idles at a few MiB until the trigger file appears, then takes 100 MiB and holds it:
# above the 64 MiB max, below RLIMIT_DATA (2 x max). On SIGUSR1 it forks a child that
# sleeps, so that what is below it changes while its files are kept open.
WORKER = """
import os, signal, sys, time
trigger = sys.argv[1]
def fork(*_):
    if os.fork() == 0:
        time.sleep(1000)
        os._exit(0)
signal.signal(signal.SIGUSR1, fork)
while not os.path.exists(trigger):
    time.sleep(0.02)
hog = bytearray(100 << 20)
hog[::4096] = b"x" * len(hog[::4096])
print("jumped", flush=True)
time.sleep(1000)
"""


def proc_fds(pid: int) -> list[str]:
    """This process's descriptors open on ``/proc/<pid>/...``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor, closed since
        if target.startswith(f"/proc/{pid}/"):
            out.append(target)
    return out


def catches(pid: int, sig: int) -> bool:
    """Has ``pid`` installed a handler for ``sig`` (``SigCgt`` in its status)?"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Rig:
    """A portable backend with workers each alone in a partition with a 64 MiB max."""

    def __init__(self, tmp: Path, interval: float = 0.05) -> None:
        self.tmp = tmp
        self.backend = PortableBackend(sample_interval=interval)
        # The test process is no subreaper: nothing is re-parented to it, no orphans.
        self.backend.use_orphan_source(list)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Processes a worker forked (found in its leaf), killed with the workers.
        self.forked: set[int] = set()

    def start(self, name: str) -> subprocess.Popen[bytes]:
        part = Partition(f"t/{name}", memory_max=64 * MiB)
        self.backend.create(part)
        request = SpawnRequest(
            partition=part.path,
            leaf="w-0",
            argv=[sys.executable, "-c", WORKER, str(self.tmp / f"{name}.go")],
            cwd=None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.backend.spawn(request)
        self.procs[name] = proc
        return proc

    def sample_until(
        self, done: Callable[[list[BackendEvent]], bool], timeout: float = 30.0
    ) -> list[BackendEvent]:
        deadline = time.monotonic() + timeout
        events: list[BackendEvent] = []
        while time.monotonic() < deadline:
            events += self.backend.sample()
            if done(events):
                return events
            time.sleep(self.backend.sample_interval)
        raise AssertionError(f"timed out; events so far: {events}")

    def close(self) -> None:
        for pid in self.forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("kept", [True, False], ids=["kept-open", "at-the-fd-ceiling"])
def test_a_worker_read_through_kept_files_is_still_killed_at_its_max(rig: Rig, kept: bool) -> None:
    if not kept:
        # No descriptor may be kept: every read goes by path, and enforcement holds.
        rig.backend._files = ProcFiles(horizon=rig.backend._files.horizon, ceiling=0)
    proc = rig.start("a")
    # Idle passes first (each one due: hurried), so that the files are opened and then
    # re-read several times before the jump, not opened once after it.
    for _ in range(5):
        rig.backend._schedule.hurry(["t/a"])
        assert rig.backend.sample() == []
        time.sleep(0.05)
    assert len(rig.backend._files) == (1 if kept else 0)
    assert rig.backend._files.descriptors() == (2 if kept else 0)
    (rig.tmp / "a.go").touch()
    events = rig.sample_until(lambda ev: any(e.kind is EventKind.MEMORY_LIMIT for e in ev))
    (limit,) = [e for e in events if e.kind is EventKind.MEMORY_LIMIT]
    assert limit.partition == "t/a"
    killed, current = limit.detail["killed"], limit.detail["current"]
    assert isinstance(killed, list) and proc.pid in killed
    assert isinstance(current, int) and current > 64 * MiB
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert rig.backend.leaf_exit_reason("t/a", "w-0") == "memory-limit"


def test_a_child_forked_after_the_files_were_opened_is_counted(rig: Rig) -> None:
    proc = rig.start("a")
    for _ in range(3):
        rig.backend._schedule.hurry(["t/a"])
        rig.backend.sample()
        time.sleep(0.05)
    before = set(rig.backend.pids("t/a", "w-0"))
    assert before == {proc.pid}
    # Before its handler is in place the signal would end it: wait for the handler.
    wait_until(lambda: catches(proc.pid, signal.SIGUSR1))
    os.kill(proc.pid, signal.SIGUSR1)  # it forks a child now
    rig.backend._schedule.hurry(["t/a"])

    def two(_: list[BackendEvent]) -> bool:
        members = rig.backend._tally_kept({"t/a"}, time.monotonic())[1]
        rig.forked.update(pid for _, pid in members.get("t/a", ()) if pid != proc.pid)
        return len(members.get("t/a", ())) == 2

    rig.sample_until(two)
    # Read through the kept children file of the worker, not by path.
    assert any(t.endswith("/children") for t in proc_fds(proc.pid))


def test_the_files_of_an_ended_worker_are_closed_at_the_next_pass(rig: Rig) -> None:
    procs = [rig.start(n) for n in ("a", "b", "c")]
    for _ in range(3):
        rig.backend._schedule.hurry(["t/a", "t/b", "t/c"])
        rig.backend.sample()
        time.sleep(0.05)
    for p in procs:
        assert len(proc_fds(p.pid)) == 2  # its stat and its children file
    procs[0].kill()
    procs[0].wait(timeout=30)
    rig.backend._schedule.hurry(["t/a", "t/b", "t/c"])
    rig.backend.sample()
    assert proc_fds(procs[0].pid) == []
    assert len(rig.backend._files) == 2
    assert [len(proc_fds(p.pid)) for p in procs[1:]] == [2, 2]


def test_files_no_pass_reads_any_more_are_closed_by_the_sweep(rig: Rig) -> None:
    a, b = rig.start("a"), rig.start("b")
    rig.backend.sample()
    assert len(proc_fds(a.pid)) == 2
    # The daemon let go of ``a``'s leaf (its run ended as far as the backend knows) while
    # the process lives on: no pass walks it any more.
    rig.backend.release_leaf("t/a", "w-0")
    deadline = time.monotonic() + 2 * rig.backend._files.horizon + 10
    while proc_fds(a.pid) and time.monotonic() < deadline:
        rig.backend._schedule.hurry(["t/b"])
        rig.backend.sample()
        time.sleep(0.05)
    assert proc_fds(a.pid) == []
    assert len(proc_fds(b.pid)) == 2  # read at every pass: kept


def test_the_shutdown_closes_every_kept_file(rig: Rig) -> None:
    procs = [rig.start(n) for n in ("a", "b")]
    rig.backend.sample()
    assert rig.backend._files.descriptors() == 4
    assert rig.backend.destroy_all(["t"]) == []
    assert rig.backend._files.descriptors() == 0
    for p in procs:
        assert p.wait(30) == -signal.SIGKILL
        assert proc_fds(p.pid) == []


def test_a_kept_stat_of_a_reaped_process_is_not_read_again() -> None:
    files = ProcFiles()
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        files.begin(time.monotonic())
        first = files.stat(proc.pid)
        assert first is not None and first.startswith(f"{proc.pid} (sleep)".encode())
        assert files.children(proc.pid, proc.pid) == b""
        assert len(proc_fds(proc.pid)) == 2
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # The number may belong to another process by now; the kept file names the old one:
    # it is dropped and the path read afresh (nothing there).
    assert files.stat(proc.pid) is None
    assert len(files) == 0
    assert proc_fds(proc.pid) == []


@pytest.mark.parametrize("workers", [10, 100, 1000, 5000])
def test_under_the_limit_the_daemon_sets_every_worker_s_files_are_kept(workers: int) -> None:
    # daemon.raise_fd_limit: twice fd_needs (the backend's per-worker count, plus one).
    need = FDS_BASE + FDS_CONNECTIONS + workers * (FDS_PER_WORKER["portable"] + 1)
    soft = 2 * need
    # What the daemon holds besides the cache: its own, and per running worker its log
    # writer's pipe and lock and a spare (measured: about three at 1000 workers).
    held = FDS_BASE + 3 * workers
    assert ceiling_for(soft) >= held + 2 * workers
    # ...and what stays free above the ceiling is at least the connections' share.
    assert soft - ceiling_for(soft) >= FDS_CONNECTIONS
