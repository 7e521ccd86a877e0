"""The daemon's shutdown in bulk (supervise/shutdown.py) on the real daemon, cgroup v1 and
portable: workers stopped by the shutdown leave their leaves to the partitions' removal,
which kills what is left in one pass and removes every partition, and their logs to
their writers' EOF.

What a user must still see, whatever the speed: no process of any worker left once the
daemon is gone (grandchildren that left the worker's process group included), every
run's last lines in its log, an unfinished one ended, no cgroup left (the ``cg``
fixture), and where ``after`` asks for order, nothing of the later tenant left when the
earlier one is stopped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from supervisord_qnx.supervise import state as runtime_state
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import PY, ConfigDir, pid_alive, worker_py

pytestmark = pytest.mark.integration

# A worker that starts a grandchild in a session of its own (the stop signal to the
# worker's process group does not reach it: only the leaf's clean-up does), writes the
# grandchild's pid to its log and to PIDFILE, and on SIGTERM writes its run's last line
# (its handler is in place before the pid file appears, which the tests wait for).
LEAVES_A_GRANDCHILD = """
import signal, subprocess, sys, time
def term(*_):
    print("last line of the run", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
g = subprocess.Popen(["sleep", "1000"], start_new_session=True)
print(f"grandchild {g.pid}", flush=True)
open(PIDFILE + ".tmp", "w").write(str(g.pid))
__import__("os").replace(PIDFILE + ".tmp", PIDFILE)
while True:
    time.sleep(0.1)
"""

# On SIGTERM, says whether the grandchild named in PIDFILE (another tenant's) is gone;
# "up" once its handler is in place.
LOOKS_AT_A_GRANDCHILD = """
import signal, sys, time
def gone(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"
def term(*_):
    pid = int(open(PIDFILE).read())
    print("the later tenant's grandchild is " + ("gone" if gone(pid) else "alive"), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("up", flush=True)
while True:
    time.sleep(0.1)
"""


# Writes a line it does not end, starts a grandchild in a session of its own that holds
# the log pipe (and writes nothing), names it in PIDFILE, and sleeps until stopped
# (SIGTERM's default: no last words). Its writer sees EOF only once the partitions'
# removal has killed the grandchild, and then ends the unfinished line.
ENDS_MID_LINE = """
import subprocess, sys, time
g = subprocess.Popen(["sleep", "1000"], start_new_session=True)
sys.stdout.write("no newline after this")
sys.stdout.flush()
open(PIDFILE + ".tmp", "w").write(str(g.pid))
__import__("os").replace(PIDFILE + ".tmp", PIDFILE)
while True:
    time.sleep(0.1)
"""


@pytest.fixture(params=["cgroup1", "portable"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The daemon's backend options; cgroup1 with a unique root that must be empty after
    the test (requested before ``start_daemon``: torn down after the daemon stopped)."""
    if request.param == "cgroup1":
        cg: CgroupRoot = request.getfixturevalue("cg")
        return {"backend": "cgroup1", "cgroup_root": cg.name}
    return {"backend": "portable"}


def program(code: str, pidfile: Path) -> str:
    return worker_py(f"PIDFILE = {str(pidfile)!r}\n{code}")


def tenant(cfg: ConfigDir, name: str, command: str, after: str = "") -> None:
    cfg.tenant(
        name,
        f"""
        {f'after = ["{after}"]' if after else ""}
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "w"
        command = {command}
        stop_timeout = 10
        """,
    )


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    with trio.fail_after(timeout):
        while not path.exists() or not path.read_text():
            await trio.sleep(0.02)
    return path.read_text()


async def test_shutdown_leaves_no_process_and_complete_logs(
    backend: dict[str, str], cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    names = [f"t{i}" for i in range(6)]
    for name in names:
        tenant(cfg, name, program(LEAVES_A_GRANDCHILD, tmp_path / f"{name}.pid"))
    d = await start_daemon(**backend)
    workers = {w["tenant"]: w["pid"] for w in await d.call("status")}
    assert sorted(workers) == names and all(workers.values())
    grandchildren = [int(await wait_for_file(tmp_path / f"{n}.pid")) for n in names]
    assert all(pid_alive(p) for p in grandchildren)

    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(30):
        await d.daemon.stopped.wait()

    assert [p for p in [*workers.values(), *grandchildren] if pid_alive(p)] == []
    for name in names:
        lines = cfg.worker_log(name, "w-0").read_text().splitlines()
        assert lines[-1] == "last line of the run", (name, lines)
    # (the cg fixture fails the test if any cgroup of the daemon is left)


async def test_shutdown_keeps_after_order_down_to_the_grandchildren(
    cg: CgroupRoot, cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    # "late" starts after "early", so it is stopped first, and "early" only once nothing
    # of "late" is left: its worker's grandchild, outside the worker's process group,
    # included. Without order ("free"), the bulk path may leave it to the removal.
    pidfile = tmp_path / "late.pid"
    tenant(cfg, "early", program(LOOKS_AT_A_GRANDCHILD, pidfile))
    tenant(cfg, "late", program(LEAVES_A_GRANDCHILD, pidfile), after="early")
    tenant(cfg, "free", program(LEAVES_A_GRANDCHILD, tmp_path / "free.pid"))
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    grandchild = int(await wait_for_file(pidfile))
    await wait_for_file(cfg.worker_log("early", "w-0"))  # "up": its handler is in place
    free_grandchild = int(await wait_for_file(tmp_path / "free.pid"))

    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(30):
        await d.daemon.stopped.wait()

    early = cfg.worker_log("early", "w-0").read_text().splitlines()
    assert early[-1] == "the later tenant's grandchild is gone", early
    assert not pid_alive(grandchild) and not pid_alive(free_grandchild)
    for name in ("late", "free"):
        assert cfg.worker_log(name, "w-0").read_text().splitlines()[-1] == "last line of the run"


async def test_shutdown_ends_an_unfinished_line_once_the_pipe_is_let_go(
    backend: dict[str, str], cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    # The daemon waits for no run-end mark at shutdown: the writer ends the line at EOF,
    # which comes only once the partitions' removal killed the grandchild holding the
    # pipe. One writer is held up by its log's lock (as by another writer's long append):
    # the daemon is stopped only once even that one wrote the line out.
    names = [f"m{i}" for i in range(4)]
    for name in names:
        tenant(cfg, name, program(ENDS_MID_LINE, tmp_path / f"{name}.pid"))
    d = await start_daemon(**backend)
    # Each wrote its unfinished line before naming its grandchild.
    grandchildren = [int(await wait_for_file(tmp_path / f"{n}.pid")) for n in names]
    lock = cfg.worker_log("m0", "w-0").with_name("w-0.log.lock")
    holder = await trio.lowlevel.open_process(
        [PY, "-c", HOLDS_A_LOCK, str(lock), str(LOCK_HELD)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.receive_some()).startswith(b"locked")

        assert await d.call("shutdown") == "shutting down"
        with trio.fail_after(30):
            await d.daemon.stopped.wait()

        assert [p for p in grandchildren if pid_alive(p)] == []
        for name in names:
            assert cfg.worker_log(name, "w-0").read_bytes() == b"no newline after this\n", name
    finally:
        holder.kill()
        await holder.wait()


# Holds an exclusive lock on the file argv[1] (a log's lock file, which a writer takes
# for each append) for argv[2] seconds, then exits; says "locked" once it has it.
HOLDS_A_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""
# Well within the daemon's wait for its writers (daemon.LOG_WRITERS_WAIT), and longer
# than a shutdown of four workers takes.
LOCK_HELD = 0.6


async def test_the_state_file_says_how_the_shutdown_ended(
    backend: dict[str, str], cfg: ConfigDir, start_daemon
) -> None:
    # Written once, beside the partitions' removal: every worker stopped, and the
    # operator's decisions kept for the next daemon.
    for name in ("kept", "held"):
        tenant(cfg, name, '["sleep", "1000"]')
    d = await start_daemon(**backend)
    await d.call("stop", tenant="held")

    assert await d.call("shutdown") == "shutting down"
    with trio.fail_after(30):
        await d.daemon.stopped.wait()

    body = runtime_state.load(d.daemon.state.path.parent)
    assert body is not None and body["reason"] == "shutdown"
    assert body["tenants"]["held"]["operator"] == "stopped"
    instances = [i for t in body["tenants"].values() for i in t["instances"].values()]
    assert [(i["state"], i["pid"]) for i in instances] == [("stopped", None)] * 2
