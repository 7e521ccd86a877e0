"""Tenant confinement (docs/security.md#tenants) through the real daemon: real worker
processes under real uids, probed from inside (what a hostile tenant could do) and from
outside (what the kernel says about them in /proc).

Needs root (only root can run workers as other users); here, and in CI, tests run as
root. Tenant names carry a per-session suffix: the probes find their victims by a
marker on the command line, and tests of other worktrees run at the same time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.config.load import ConfigError, load
from supervisord_qnx.partition.process import ProcessSettings
from supervisord_qnx.wasm.forkserver import PROBE_ENV
from tests.conftest import PY, REPO, ConfigDir, worker_py

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="only root can run workers as other users"),
]

RUN = uuid.uuid4().hex[:6]
HEARTBEAT = REPO / "config" / "wasm" / "heartbeat.wat"

# What a hostile worker tries against another tenant's process, found by the marker
# on its command line (/proc/PID/cmdline is world-readable without hidepid), and what
# it can see of itself. One JSON line on stdout, then it idles.
PROBE = """
import json, os, resource, sys, time
marker = sys.argv[1]
def find():
    for p in os.listdir('/proc'):
        if p.isdigit() and int(p) != os.getpid():
            try:
                with open(f'/proc/{p}/cmdline', 'rb') as f:
                    if marker.encode() in f.read().split(b'\\0'):
                        return int(p)
            except OSError:
                pass
deadline = time.monotonic() + 30
victim = None
while marker != 'none' and (victim := find()) is None and time.monotonic() < deadline:
    time.sleep(0.05)
def attempt(fn):
    if victim is None:
        return 'no victim'
    try:
        fn()
        return 'allowed'
    except OSError as exc:
        return type(exc).__name__
def read_mem():
    with open(f'/proc/{victim}/mem', 'rb') as f:
        f.read(1)
def read_environ():
    with open(f'/proc/{victim}/environ', 'rb') as f:
        f.read()
status = dict(
    line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line
)
inherited = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        inherited.append(fd)
    except OSError:
        pass
mask = os.umask(0)
out = {
    'victim': victim,
    'mem': attempt(read_mem),
    'environ': attempt(read_environ),
    'signal': attempt(lambda: os.kill(victim, 0)),
    'status': {k: v.strip() for k, v in status.items()},
    'fds': inherited,
    'umask': mask,
    'core': list(resource.getrlimit(resource.RLIMIT_CORE)),
    'env': sorted(os.environ),
}
print('RESULT ' + json.dumps(out), flush=True)
time.sleep(1000)
"""


def probe_argv(marker: str) -> str:
    return "[" + ", ".join(json.dumps(a) for a in (PY, "-c", PROBE, marker)) + "]"


def victim_argv(marker: str) -> str:
    return (
        "["
        + ", ".join(json.dumps(a) for a in (PY, "-c", "import time; time.sleep(1000)", marker))
        + "]"
    )


async def result_line(log: Path, timeout: float = 30.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            if log.exists():
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith("RESULT "):
                        return dict(json.loads(line[len("RESULT ") :]))
            await trio.sleep(0.05)


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {
        k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
    }


def uid_of(pid: int) -> int:
    return int(proc_status(pid)["Uid"].split()[0])


@pytest.fixture
def daemon_dumps_cores() -> Iterator[None]:
    """The daemon (this process) may dump cores: its workers must still get none."""
    core = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, core)


async def test_a_worker_cannot_reach_another_tenants_worker(
    cfg: ConfigDir, start_daemon, monkeypatch: pytest.MonkeyPatch, daemon_dumps_cores: None
) -> None:
    # The daemon runs in this process: its own environment must reach no worker.
    monkeypatch.setenv("INVOCATION_ID", "daemon-secret-invocation")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("SUPERVISORD_QNX_DAEMON_SECRET", "x")
    a, b = f"conf-a-{RUN}", f"conf-b-{RUN}"
    marker = f"victim-{RUN}"
    cfg.tenant(
        b,
        f"""
        flags = ["memory-isolation"]
        [[worker]]
        name = "victim"
        env = {{ SECRET = "tenant-b-secret" }}
        command = {victim_argv(marker)}
        """,
    )
    cfg.tenant(
        a,
        f"""
        flags = ["memory-isolation"]
        [[worker]]
        name = "probe"
        command = {probe_argv(marker)}
        """,
    )
    d = await start_daemon()
    seen = await result_line(cfg.worker_log(a, "probe-0"))
    victim = await d.wait_for(f"{b}:victim-0", lambda w: w["state"] == "running")
    prober = await d.wait_for(f"{a}:probe-0", lambda w: w["state"] == "running")
    assert seen["victim"] == victim["pid"]

    # Each memory-isolated tenant has a uid of its own, and neither is root.
    ua, ub = uid_of(prober["pid"]), uid_of(victim["pid"])
    assert 0 not in (ua, ub) and ua != ub
    # So the kernel refuses the other tenant's memory, environment and signals.
    assert seen["mem"] == "PermissionError"
    assert seen["environ"] == "PermissionError"
    assert seen["signal"] == "PermissionError"

    status = seen["status"]
    assert status["NoNewPrivs"] == "1"
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[field] == "0000000000000000", (field, status[field])
    assert status["Groups"] == ""  # no supplementary groups unless listed
    assert seen["fds"] == []  # nothing beyond 0, 1, 2
    assert seen["umask"] == 0o077
    assert seen["core"] == [0, 0]  # no core dumps, and no way to turn them back on
    env = set(seen["env"])
    assert not env & {"INVOCATION_ID", "NOTIFY_SOCKET", "SUPERVISORD_QNX_DAEMON_SECRET"}
    assert {e for e in env if e.startswith("SUPERVISORD_")} <= {
        "SUPERVISORD_QNX_TENANT",
        "SUPERVISORD_QNX_WORKER",
        "SUPERVISORD_QNX_INSTANCE",
        "SUPERVISORD_QNX_PARTITION",
        "SUPERVISORD_QNX_LEAF",  # the portable backend's partition tag
        "SUPERVISORD_QNX_OWNER",  # which daemon's worker (a digest; supervise/leftovers.py)
    }
    assert (
        Path(f"/proc/{prober['pid']}/environ")
        .read_bytes()
        .split(b"\0")
        .count(b"PATH=/usr/local/bin:/usr/bin:/bin")
        == 1
    )


async def test_listed_capabilities_are_the_only_ones_a_worker_keeps(
    cfg: ConfigDir, start_daemon, daemon_dumps_cores: None
) -> None:
    name = f"conf-cap-{RUN}"
    cfg.tenant(
        name,
        f"""
        user = "nobody"
        capabilities = ["CAP_NET_BIND_SERVICE"]
        umask = 0o027
        rlimits = {{ nofile = 64 }}
        [[worker]]
        name = "probe"
        command = {probe_argv("none")}
        """,
    )
    await start_daemon()
    seen = await result_line(cfg.worker_log(name, "probe-0"), timeout=60)
    status = seen["status"]
    assert status["Uid"].split()[0] == "65534"
    # Bit 10: CAP_NET_BIND_SERVICE, kept across the switch to a non-root uid (ambient).
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[field] == "0000000000000400", (field, status[field])
    assert status["NoNewPrivs"] == "1"
    assert seen["umask"] == 0o027
    assert seen["core"] == [0, 0]  # the default, not the daemon's own


async def test_root_needs_allow_root_and_keeps_no_capabilities(
    cfg: ConfigDir, start_daemon
) -> None:
    name = f"conf-root-{RUN}"
    body = f"""
        user = "root"
        [[worker]]
        name = "probe"
        command = {probe_argv("none")}
        """
    path = cfg.tenant(name, body)
    cfg.write()
    with pytest.raises(ConfigError) as err:
        load(cfg.path)
    assert f"{path}: user: root (0) is root" in str(err.value)
    assert "allow_root = true" in str(err.value)

    cfg.tenant(name, "allow_root = true\n" + body)
    await start_daemon()
    status = (await result_line(cfg.worker_log(name, "probe-0"), timeout=60))["status"]
    assert status["Uid"].split()[0] == "0"
    # Root, but with an empty bounding set: no capability at all, none to regain.
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"


def test_check_shows_who_each_tenant_runs_as(cfg: ConfigDir) -> None:
    for name, head in (
        (f"chk-plain-{RUN}", ""),
        (f"chk-iso-{RUN}", 'flags = ["memory-isolation"]\n'),
        (f"chk-root-{RUN}", 'user = "root"\nallow_root = true\n'),
    ):
        cfg.tenant(name, head + '[[worker]]\nname = "w"\ncommand = ["true"]\n')
    cfg.write()
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_qnx.cli.daemon", "--config", str(cfg.path), "--check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    section = out.split("tenants run as:\n", 1)[1].splitlines()
    lines = {line.split()[0]: line for line in section if line.startswith("  chk-")}
    assert "nobody (65534)" in lines[f"chk-plain-{RUN}"]
    assert "dynamic (" in lines[f"chk-iso-{RUN}"]
    assert "root (0) [allow_root]" in lines[f"chk-root-{RUN}"]


async def test_non_root_worker_cannot_raise_its_partition_memory_limit(
    cfg: ConfigDir, start_daemon, cg
) -> None:
    name = f"conf-cg-{RUN}"
    code = (
        "import json\n"
        "line = [l for l in open('/proc/self/cgroup') if ':memory:' in l][0]\n"
        "leaf = '/sys/fs/cgroup/memory' + line.strip().split(':', 2)[2]\n"
        "out = {}\n"
        "for where in (leaf, leaf.rsplit('/', 1)[0]):\n"
        "    for f in ('memory.limit_in_bytes', 'memory.memsw.limit_in_bytes'):\n"
        "        try:\n"
        "            with open(where + '/' + f, 'w') as fh:\n"
        "                fh.write('-1')\n"
        "            out[where + '/' + f] = 'allowed'\n"
        "        except OSError as exc:\n"
        "            out[where + '/' + f] = type(exc).__name__\n"
        "print('RESULT ' + json.dumps(out), flush=True)\n"
        "import time; time.sleep(1000)\n"
    )
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "32MiB" }}
        [[worker]]
        name = "w"
        command = {worker_py(code)}
        """,
    )
    await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    seen = await result_line(cfg.worker_log(name, "w-0"))
    tried = [k for k in seen if k.endswith("/memory.limit_in_bytes")]
    assert len(tried) == 2, seen  # its own leaf and its partition
    for path, outcome in seen.items():
        if Path(path).exists():
            assert outcome == "PermissionError", (path, outcome)
    partition = cg.dir("memory", "tenants", name)
    assert int((partition / "memory.limit_in_bytes").read_text()) == 32 << 20


async def test_wasm_worker_from_the_fork_server_is_confined(
    cfg: ConfigDir, start_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVOCATION_ID", "daemon-secret-invocation")
    name, plain = f"conf-wasm-{RUN}", f"conf-wasm-plain-{RUN}"
    probe = cfg.root / "probe.json"
    cfg.tenant(
        name,
        f"""
        flags = ["memory-isolation"]
        memory = {{ max = "128MiB" }}
        [[worker]]
        name = "w"
        wasm = "{HEARTBEAT}"
        env = {{ {PROBE_ENV} = "{probe}" }}
        """,
    )
    # Without memory-isolation a forked worker is dumpable, as an exec'd one would be.
    cfg.tenant(plain, f'[[worker]]\nname = "w"\nwasm = "{HEARTBEAT}"\n')
    d = await start_daemon()
    other = await d.wait_for(f"{plain}:w-0", lambda w: w["state"] == "running")
    assert os.stat(f"/proc/{other['pid']}/mem").st_uid == uid_of(other["pid"]) == 65534
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    pid = w["pid"]
    with trio.fail_after(20):
        while not probe.exists() or not probe.read_text():
            await trio.sleep(0.02)
    assert d.daemon.supervisor.launchers.forkserver_pid is not None  # pre-forked, not exec'd
    status = proc_status(pid)
    uid = int(status["Uid"].split()[0])
    assert uid != 0
    assert status["NoNewPrivs"] == "1"
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert [line.split()[4:6] for line in limits.splitlines() if "core file" in line] == [
        ["0", "0"]
    ]
    # The daemon's environment did not reach it through the fork server's start-up one.
    assert b"INVOCATION_ID" not in Path(f"/proc/{pid}/environ").read_bytes()
    # Not dumpable: its /proc files are root's, so even a process of its own uid (another
    # worker of the same user, had it one) cannot read its memory or environment.
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0
    for what in ("mem", "environ"):
        tried = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--",
                "cat",
                f"/proc/{pid}/{what}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert tried.returncode != 0 and "Permission denied" in tried.stderr, (what, tried)


def test_qnx_on_carries_identity_abilities_and_limits() -> None:
    """On QNX there is no setpriv: the backend hands the same settings to `on`. (qnx-sim's
    `on` does not implement -u/-A, so the daemon tests on Linux use the wrappers; this
    checks the command line a QNX target would run.)"""
    from supervisord_qnx.partition.backend import SpawnRequest
    from supervisord_qnx.partition.qnx import QnxBackend
    from supervisord_qnx.partition.tree import Partition

    backend = QnxBackend()
    backend.native_on_identity = True
    settings = ProcessSettings(
        uid=61200,
        gid=61200,
        groups=(20,),
        no_new_privs=True,
        capabilities=(),
        umask=0o077,
        rlimit_core=0,
        rlimit_nofile=256,
    )
    request = SpawnRequest("tenants/a", "w-0", ["prog", "x"], None, {}, 1, 2, process=settings)
    argv = backend.launch_argv(Partition(path="tenants/a"), backend.exec_argv(request), settings)
    assert argv[0].endswith("on")
    options = argv[1 : argv.index("--")]
    assert options == [
        "-u",
        "61200:61200,20",
        "-A",
        "lock",
        "-L",
        "NOFILE:256:256",
        "-L",
        "CORE:0:0",
    ]
    # Only the umask is left to a shell wrapper; no setpriv on QNX.
    assert argv[argv.index("--") + 1 :] == [
        "/bin/sh",
        "-c",
        'umask 0077 && exec "$@"',
        "sh",
        "prog",
        "x",
    ]


CONTAINED = """
import errno, json, os, socket, sys, time
out = sys.argv[1]
def attempt(fn):
    try:
        fn()
        return 'allowed'
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
def write(path):
    with open(path, 'w') as f:
        f.write('x')
seen = {
    'pid': os.getpid(),
    'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    'tmp': sorted(os.listdir('/tmp')),
    'write_tmp': attempt(lambda: write('/tmp/mine')),
    'write_writable': attempt(lambda: write(out + '/inside')),
    'write_var_tmp': attempt(lambda: write(sys.argv[2])),
    'interfaces': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]),
    'connect': attempt(lambda: socket.create_connection(('127.0.0.1', 9), timeout=2)),
}
print('RESULT ' + json.dumps(seen), flush=True)
time.sleep(1000)
"""


async def test_container_worker_sees_only_itself_and_writes_only_where_allowed(
    cfg: ConfigDir, start_daemon
) -> None:
    name, other = f"conf-ctr-{RUN}", f"conf-ctr-b-{RUN}"
    out = cfg.root / "out"
    out.mkdir()
    out.chmod(0o1777)
    marker = Path(tempfile.mkstemp(prefix=f"conf-marker-{RUN}-")[1])
    elsewhere = Path(f"/var/tmp/conf-probe-{RUN}")  # world-writable on the box
    # The interpreter itself, not the venv's link to it: the checkout (and its venv) may
    # live under /tmp, which the container replaces with a private one.
    args = (os.path.realpath(PY), "-c", CONTAINED, str(out), str(elsewhere))
    argv = "[" + ", ".join(json.dumps(a) for a in args) + "]"
    cfg.tenant(other, f'[[worker]]\nname = "victim"\ncommand = {victim_argv("ctr-" + RUN)}\n')
    cfg.tenant(
        name,
        f"""
        flags = ["container"]
        writable = ["{out}"]
        network = "none"
        [[worker]]
        name = "probe"
        command = {argv}
        """,
    )
    d = await start_daemon()
    seen = await result_line(cfg.worker_log(name, "probe-0"))
    w = await d.wait_for(f"{name}:probe-0", lambda w: w["state"] == "running")
    # Its own PID namespace: its init is 1; nothing else of the box is visible.
    assert seen["pids"] == [1, seen["pid"]], seen["pids"]
    # A private /tmp (the box's marker file is not there), writable.
    assert marker.name not in seen["tmp"] and seen["write_tmp"] == "allowed"
    assert seen["write_writable"] == "allowed"
    assert (out / "inside").read_text() == "x"
    # Everything else is read-only: /var/tmp is world-writable on the box, not in here.
    assert seen["write_var_tmp"] == "EROFS"
    assert not elsewhere.exists()
    assert seen["interfaces"] == ["lo"] and seen["connect"] == "ENETUNREACH"
    # The supervised pid is the one the daemon started; a stop reaches the program.
    assert Path(f"/proc/{w['pid']}/cmdline").read_bytes().split(b"\0")[0].endswith(b"unshare")
    stopped = await d.call("stop", tenant=name, wait=True)
    marker.unlink()
    assert stopped[0]["state"] == "stopped"
    assert stopped[0]["exit_reason"] != "stopped (signal:SIGKILL)", stopped


DELEGATED = """
import json, os, time
line = [l for l in open('/proc/self/cgroup') if ':memory:' in l][0]
partition = '/sys/fs/cgroup/memory' + line.strip().split(':', 2)[2].rsplit('/', 1)[0]
def attempt(fn):
    try:
        fn()
        return 'allowed'
    except OSError as exc:
        return type(exc).__name__
def move():
    with open(partition + '/mine/cgroup.procs', 'w') as f:
        f.write(str(os.getpid()))
def raise_limit():
    with open(partition + '/memory.limit_in_bytes', 'w') as f:
        f.write('-1')
out = {'mkdir': attempt(lambda: os.mkdir(partition + '/mine'))}
out['move'] = attempt(move) if out['mkdir'] == 'allowed' else 'no sub-partition'
out['limit'] = attempt(raise_limit)
print('RESULT ' + json.dumps(out), flush=True)
time.sleep(1000)
"""


async def test_delegate_hands_over_the_subtree_never_the_partitions_limits(
    cfg: ConfigDir, start_daemon, cg
) -> None:
    kept, handed = f"conf-nodel-{RUN}", f"conf-del-{RUN}"
    for name, extra in ((kept, ""), (handed, "delegate = true\n")):
        cfg.tenant(
            name,
            extra + f'memory = {{ max = "32MiB" }}\n'
            f'[[worker]]\nname = "w"\ncommand = {worker_py(DELEGATED)}\n',
        )
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    assert (await result_line(cfg.worker_log(kept, "w-0")))["mkdir"] == "PermissionError"
    seen = await result_line(cfg.worker_log(handed, "w-0"))
    assert seen == {"mkdir": "allowed", "move": "allowed", "limit": "PermissionError"}
    w = await d.wait_for(f"{handed}:w-0", lambda w: w["state"] == "running")
    assert f"/{handed}/mine\n" in Path(f"/proc/{w['pid']}/cgroup").read_text()
    assert int(cg.dir("memory", "tenants", handed, "memory.limit_in_bytes").read_text()) == 32 << 20
    # Stopping removes what the tenant made too (the cg fixture checks nothing is left).
    await d.call("stop", tenant=handed, wait=True)


async def test_the_fork_server_runs_in_a_partition_of_its_own(
    cfg: ConfigDir, start_daemon, cg, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVOCATION_ID", "daemon-secret-invocation")
    name = f"conf-fs-{RUN}"
    cfg.tenant(name, f'[[worker]]\nname = "w"\nwasm = "{HEARTBEAT}"\n')
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.name)
    await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    server = d.daemon.supervisor.launchers.forkserver_pid
    assert server is not None
    memory = [
        line
        for line in Path(f"/proc/{server}/cgroup").read_text().splitlines()
        if ":memory:" in line
    ]
    # Its own leaf under the daemon's root, not the daemon's own cgroup.
    assert memory and memory[0].endswith(f"/{cg.name}/@wasm-forkserver"), memory
    assert server in [
        int(p) for p in cg.dir("memory", "@wasm-forkserver", "cgroup.procs").read_text().split()
    ]
    # Started with a scrubbed environment: nothing of the daemon's.
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith(b"INVOCATION_ID=")]
    assert b"PATH=/usr/local/bin:/usr/bin:/bin" in environ
    # The cg fixture fails the test if the leaf is left behind after shutdown.


# What a tenant under `seccomp = "default"` tries: calls an unprivileged process may
# make (so only the filter can refuse them), and one it needs (to show the filter is a
# deny list, not a sandbox that breaks programs).
SECCOMP_PROBE = """
import ctypes, errno, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
def call(*args):
    return 'allowed' if libc.syscall(*args) >= 0 else errno.errorcode[ctypes.get_errno()]
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
out = {
    'seccomp': status['Seccomp'].strip(),
    'kcmp': call(312, os.getpid(), os.getpid(), 0, 0, 0),  # KCMP_FILE, of itself
    'keyctl': call(250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    'getpid': 'allowed' if libc.syscall(39) == os.getpid() else 'broken',
}
print('RESULT ' + json.dumps(out), flush=True)
time.sleep(1000)
"""


async def test_seccomp_default_refuses_what_only_the_filter_can_refuse(
    cfg: ConfigDir, start_daemon
) -> None:
    filtered, plain = f"conf-sc-{RUN}", f"conf-nosc-{RUN}"
    argv = "[" + ", ".join(json.dumps(a) for a in (PY, "-c", SECCOMP_PROBE)) + "]"
    for name, key in ((filtered, 'seccomp = "default"\n'), (plain, "")):
        cfg.tenant(name, f'{key}user = "nobody"\n[[worker]]\nname = "p"\ncommand = {argv}\n')
    d = await start_daemon()
    with_filter = await result_line(cfg.worker_log(filtered, "p-0"), timeout=60)
    without = await result_line(cfg.worker_log(plain, "p-0"), timeout=60)
    # The same user, the same calls: only the filter tells them apart.
    assert without == {
        "seccomp": "0",
        "kcmp": "allowed",
        "keyctl": "allowed",
        "getpid": "allowed",
    }
    assert with_filter == {
        "seccomp": "2",  # SECCOMP_MODE_FILTER
        "kcmp": "EPERM",
        "keyctl": "EPERM",
        "getpid": "allowed",
    }
    w = await d.wait_for(f"{filtered}:p-0", lambda w: w["state"] == "running")
    assert proc_status(w["pid"])["Uid"].split()[0] == "65534"  # the drop still happened


async def test_seccomp_default_reaches_fork_server_workers(cfg: ConfigDir, start_daemon) -> None:
    name = f"conf-scw-{RUN}"
    cfg.tenant(name, f'seccomp = "default"\n[[worker]]\nname = "w"\nwasm = "{HEARTBEAT}"\n')
    d = await start_daemon()
    w = await d.wait_for(f"{name}:w-0", lambda w: w["state"] == "running")
    assert d.daemon.supervisor.launchers.forkserver_pid is not None  # pre-forked, not exec'd
    assert proc_status(w["pid"])["Seccomp"] == "2"
    assert proc_status(d.daemon.supervisor.launchers.forkserver_pid)["Seccomp"] == "0"


@pytest.mark.parametrize(
    ("head", "key", "reason"),
    [
        ('user = "no-such-user-here"\n', "user", "no such user: 'no-such-user-here'"),
        ('group = "no-such-group-here"\n', "group", "no such group: 'no-such-group-here'"),
        ('capabilities = ["CAP_FLY"]\n', "capabilities[0]", "'CAP_FLY' is not a Linux capability"),
        ('umask = "9"\n', "umask", "'9' is not an octal umask"),
        ('network = "none"\n', "(tenant)", "writable and network need flags"),
        ('flags = ["container"]\nwritable = ["/"]\n', "writable", "must not be / or hold"),
        ("rlimits = { nofile = 0 }\n", "rlimits.nofile", "greater than or equal to 1"),
        ('seccomp = "strict"\n', "seccomp", "'none' or 'default'"),
    ],
)
def test_bad_confinement_settings_name_file_key_and_reason(
    cfg: ConfigDir, head: str, key: str, reason: str
) -> None:
    path = cfg.tenant("bad", head + '[[worker]]\nname = "w"\ncommand = ["true"]\n')
    cfg.write()
    with pytest.raises(ConfigError) as err:
        load(cfg.path)
    text = str(err.value)
    assert str(path) in text and reason in text, text
    if key != "(tenant)":
        assert f"{path}: {key}" in text, text
