"""Fault 5 of issue 8: ``attach``/``detach`` with a contract.

``attach {"pid": 0}`` used to move the daemon itself into a tenant partition (writing 0
to ``cgroup.procs`` moves the writer), ``detach`` could not undo it, pid 1 and any
foreign process could be attached and were then SIGKILLed at shutdown or by the next
start's reaping, ``detach`` of a pid never attached "succeeded", and a pid that does not
exist gave ``backend_error``. Each case against the real daemon on the portable and the
cgroup v1 backend, with processes this test starts itself.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from supervisord_qnx.control.rpc import ErrorCode, RpcError
from supervisord_qnx.partition import cgroupfs as fs
from tests.cgroup_helpers import CgroupRoot, require_cgroup1
from tests.conftest import ConfigDir, cli_env, pid_alive, wait_until, worker_py
from tests.daemonproc import DAEMON, ctl

pytestmark = pytest.mark.integration

MiB = 1 << 20
SLEEPER = worker_py("import time\ntime.sleep(1000)")


@dataclass
class Backend:
    name: str
    cg: CgroupRoot | None

    def options(self) -> dict[str, str]:
        return {"cgroup_root": self.cg.name} if self.cg else {}


@pytest.fixture(params=["portable", "cgroup1"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Requested before ``start_daemon``, so it is torn down after the daemon stopped."""
    if request.param == "portable":
        yield Backend("portable", None)
        return
    require_cgroup1()
    root = CgroupRoot()
    yield Backend("cgroup1", root)
    left = root.leftovers()
    if left:
        root.reap()
    assert not left, f"cgroup directories left behind: {left}"


def alpha(cfg: ConfigDir) -> None:
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "64MiB" }}
        [[worker]]
        name = "w"
        command = {SLEEPER}
        """,
    )


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this test's own: the only kind it attaches, detaches and kills."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(timeout=30)


class OwnCgroup:
    """A cgroup of this test's own in the memory and pids hierarchies, to put the child
    in before ``attach``: ``detach`` must bring it back here, not to the daemon's cgroup."""

    def __init__(self) -> None:
        own = fs.own_cgroups()
        name = f"sqnx-attach-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dirs: dict[str, Path] = {}
        for m in fs.cgroup_mounts():
            for controller in ("memory", "pids"):
                if m.fstype == "cgroup" and controller in m.options and controller in own:
                    parent = m.mountpoint / fs.relative_to_mount(own[controller], m).lstrip("/")
                    self.dirs[controller] = parent / name
        for d in self.dirs.values():
            d.mkdir()

    def enter(self, pid: int) -> None:
        for d in self.dirs.values():
            (d / "cgroup.procs").write_text(str(pid))

    def path(self, controller: str) -> str:
        """The path /proc/PID/cgroup shows for a member."""
        own = fs.own_cgroups()[controller]
        return f"{own.rstrip('/')}/{self.dirs[controller].name}"

    def remove(self) -> None:
        for d in self.dirs.values():
            fs.rmdir_retry(d, "test")


@pytest.fixture
def test_cgroup(backend: Backend) -> Iterator[OwnCgroup | None]:
    if backend.cg is None:
        yield None
        return
    tc = OwnCgroup()
    yield tc
    tc.remove()


ZOMBIE_PARENT = """
import os, time
pid = os.fork()
if pid == 0:
    os._exit(0)
print(pid, flush=True)
time.sleep(300)
"""


def _status_line(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines(keepends=True):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].lstrip(" ")
    return ""


def cgroups_of(pid: int) -> dict[str, str]:
    return fs.own_cgroups(Path(f"/proc/{pid}/cgroup").read_text())


async def pids_of(d, partition: str) -> list[int]:
    report = await d.call("partitions")
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        if node["path"] == partition:
            return list(node["usage"]["pids"])
        stack.extend(node["children"])
    raise KeyError(partition)


async def refused(d, code: ErrorCode, **params: object) -> str:
    with pytest.raises(RpcError) as exc:
        await d.call("attach", **params)
    assert exc.value.code == code, exc.value
    return exc.value.message


# --------------------------------------------------------------------------- refusals


async def test_attach_pid_0_is_refused_and_the_daemon_stays_put(
    backend: Backend, cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    # The daemon runs in this test process: its own cgroups are this process's.
    home = cgroups_of(os.getpid())
    await refused(d, ErrorCode.BAD_REQUEST, partition="tenants/alpha", pid=0)
    await refused(d, ErrorCode.BAD_REQUEST, partition="tenants/alpha", pid=-1)
    assert cgroups_of(os.getpid()) == home
    assert os.getpid() not in await pids_of(d, "tenants/alpha")
    with pytest.raises(RpcError) as exc:
        await d.call("detach", pid=0)
    assert exc.value.code == ErrorCode.BAD_REQUEST


async def test_attach_refuses_the_daemon_its_ancestors_pid_1_and_its_workers(
    backend: Backend, cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    target = {"partition": "tenants/alpha"}
    message = await refused(d, ErrorCode.PERMISSION_DENIED, pid=os.getpid(), **target)
    assert "daemon itself" in message
    if os.getppid() > 1:
        message = await refused(d, ErrorCode.PERMISSION_DENIED, pid=os.getppid(), **target)
        assert "ancestor" in message
    message = await refused(d, ErrorCode.PERMISSION_DENIED, pid=1, **target)
    assert "pid 1" in message or "ancestor" in message
    # pid 1 of a pid namespace of its own (a container's init), not an ancestor of ours.
    ns = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "300"])
    try:
        children = Path(f"/proc/{ns.pid}/task/{ns.pid}/children")
        wait_until(lambda: children.read_text().split() != [], 10, "the namespace's init")
        init = int(children.read_text().split()[0])
        wait_until(lambda: "\t1\n" in _status_line(init, "NSpid"), 10, "the new namespace")
        message = await refused(d, ErrorCode.PERMISSION_DENIED, pid=init, **target)
        assert "pid 1" in message and "namespace" in message
        assert init not in await pids_of(d, "tenants/alpha")
    finally:
        ns.kill()
        ns.wait(timeout=30)
    worker = (await d.worker("alpha:w-0"))["pid"]
    message = await refused(d, ErrorCode.PERMISSION_DENIED, pid=worker, **target)
    assert "supervises" in message
    # Nobody was moved: pid 1 and this process keep their cgroups.
    assert os.getpid() not in await pids_of(d, "tenants/alpha")
    assert 1 not in await pids_of(d, "tenants/alpha")


async def test_attach_of_a_dead_pid_a_zombie_or_a_thread_is_not_found(
    backend: Backend, cfg: ConfigDir, start_daemon
) -> None:
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=30)
    message = await refused(d, ErrorCode.NOT_FOUND, partition="tenants/alpha", pid=gone.pid)
    assert str(gone.pid) in message
    # A zombie whose parent is not the daemon (which would reap it at once): the child
    # of a process that never waits for it.
    parent = subprocess.Popen(["python3", "-c", ZOMBIE_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        zombie = int(parent.stdout.readline())
        wait_until(lambda: _status_line(zombie, "State").strip().startswith("Z"), 10, "a zombie")
        message = await refused(d, ErrorCode.NOT_FOUND, partition="tenants/alpha", pid=zombie)
        assert str(zombie) in message
    finally:
        parent.kill()
        parent.wait(timeout=30)
    stop = threading.Event()
    started = threading.Event()
    tid: list[int] = []

    def thread() -> None:
        tid.append(threading.get_native_id())
        started.set()
        stop.wait(30)

    t = threading.Thread(target=thread)
    t.start()
    try:
        started.wait(10)
        message = await refused(d, ErrorCode.NOT_FOUND, partition="tenants/alpha", pid=tid[0])
        assert "thread" in message
    finally:
        stop.set()
        t.join()


async def test_detach_of_a_pid_never_attached_is_invalid_state(
    backend: Backend, cfg: ConfigDir, start_daemon, child: subprocess.Popen[bytes]
) -> None:
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    before = cgroups_of(child.pid)
    with pytest.raises(RpcError) as exc:
        await d.call("detach", pid=child.pid)
    assert exc.value.code == ErrorCode.INVALID_STATE
    assert cgroups_of(child.pid) == before


# --------------------------------------------------------------------------- restore


async def test_detach_restores_what_the_process_had_before_attach(
    backend: Backend,
    test_cgroup: OwnCgroup | None,
    cfg: ConfigDir,
    start_daemon,
    child: subprocess.Popen[bytes],
) -> None:
    """cgroup1: back to the cgroups it was in (not the daemon's); portable: back to the
    RLIMIT_DATA it had (attach gives it the partition's)."""
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    own_limit = (300 * MiB, 400 * MiB)
    resource.prlimit(child.pid, resource.RLIMIT_DATA, own_limit)
    if test_cgroup is not None:
        test_cgroup.enter(child.pid)
    before = cgroups_of(child.pid)
    reply = await d.call("attach", partition="tenants/alpha", pid=child.pid)
    assert reply == {"partition": "tenants/alpha", "pid": child.pid, "own": False}
    assert child.pid in await pids_of(d, "tenants/alpha")
    if test_cgroup is not None:
        assert cgroups_of(child.pid)["memory"].endswith("/tenants/alpha")
    else:
        # Twice the partition's max (portable.py); the hard limit too where the daemon
        # may raise it back (CAP_SYS_RESOURCE), else it keeps the process's own.
        assert resource.prlimit(child.pid, resource.RLIMIT_DATA)[0] == 128 * MiB
    reply = await d.call("detach", pid=child.pid)
    assert reply == {"pid": child.pid, "partition": "tenants/alpha"}
    assert child.pid not in await pids_of(d, "tenants/alpha")
    assert cgroups_of(child.pid) == before
    if test_cgroup is not None:
        assert cgroups_of(child.pid)["memory"] == test_cgroup.path("memory")
    else:
        assert resource.prlimit(child.pid, resource.RLIMIT_DATA) == own_limit
    # Detached means forgotten: a second detach is refused.
    with pytest.raises(RpcError) as exc:
        await d.call("detach", pid=child.pid)
    assert exc.value.code == ErrorCode.INVALID_STATE


async def test_attached_process_survives_shutdown_and_owned_one_does_not(
    backend: Backend,
    test_cgroup: OwnCgroup | None,
    cfg: ConfigDir,
    start_daemon,
    child: subprocess.Popen[bytes],
) -> None:
    alpha(cfg)
    d = await start_daemon(backend=backend.name, **backend.options())
    if test_cgroup is not None:
        test_cgroup.enter(child.pid)
    before = cgroups_of(child.pid)
    owned = subprocess.Popen(["sleep", "300"])
    try:
        await d.call("attach", partition="tenants/alpha", pid=child.pid)
        reply = await d.call("attach", partition="tenants/alpha", pid=owned.pid, own=True)
        assert reply["own"] is True
        d.daemon.request_shutdown()
        with trio.fail_after(30):
            await d.daemon.stopped.wait()
        # Given back alive, where it was; the one handed over went with its partition.
        assert pid_alive(child.pid)
        assert cgroups_of(child.pid) == before
        assert owned.wait(10) == -signal.SIGKILL
    finally:
        owned.kill()
        owned.wait(timeout=30)


def test_attached_process_survives_a_crash_and_the_next_start(
    cg: CgroupRoot, cfg: ConfigDir, child: subprocess.Popen[bytes]
) -> None:
    """The daemon is SIGKILLed while a process is attached: the next start's reaping
    used to SIGKILL it with the leftovers. It gets it back where it was instead. (cgroup
    v1 only: the portable backend reaps nothing at start.)"""
    alpha(cfg)
    cfg.write(backend="cgroup1", cgroup_root=cg.name)
    own = OwnCgroup()
    own.enter(child.pid)
    before = cgroups_of(child.pid)
    procs = []
    try:
        for round_ in range(2):
            with open(cfg.root / f"daemon{round_}.out", "w") as log:
                procs.append(
                    subprocess.Popen(
                        [DAEMON, "--config", str(cfg.path)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=cli_env(),
                    )
                )
            wait_until(lambda: ctl(cfg.socket, "ping").returncode == 0, 30, "the daemon")
            if round_ == 0:
                got = ctl(cfg.socket, "attach", "tenants/alpha", str(child.pid))
                assert got.returncode == 0, got.stdout + got.stderr
                assert cgroups_of(child.pid)["memory"].endswith("/tenants/alpha")
                procs[0].kill()  # a crash: nothing is detached, the cgroups stay
                procs[0].wait(timeout=30)
        assert pid_alive(child.pid)
        assert cgroups_of(child.pid) == before
        log_text = (cfg.root / "daemon1.out").read_text()
        assert "gave back a process attached by a previous run" in log_text
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        child.kill()
        child.wait(timeout=30)
        own.remove()
