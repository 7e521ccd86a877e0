"""The daemon as operators run it: ``supervisord-qnx`` as a subprocess, driven through
``supervisorctl-qnx`` and signals. Exit codes and printed text are the contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, ConfigDir, pid_alive, wait_until, worker_py
from tests.daemonproc import CTL, DAEMON, DaemonProc, ctl

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(daemon_procs: Callable[..., DaemonProc]) -> Callable[..., DaemonProc]:
    return daemon_procs


BEAT = worker_py("import time\nwhile True: print('beat', flush=True); time.sleep(0.2)")


def beat_tenant(cfg: ConfigDir, name: str) -> None:
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "128MiB" }}
        [[worker]]
        name = "beat"
        command = {BEAT}
        """,
    )


def test_status_json_and_sigterm_clean_exit(cfg: ConfigDir, daemon) -> None:
    beat_tenant(cfg, "alpha")
    beat_tenant(cfg, "bravo")
    cfg.write()
    d = daemon()
    table = ctl(cfg.socket, "status", check=True)
    assert "alpha:beat-0" in table.stdout and "running" in table.stdout
    assert table.stdout.splitlines()[0].split()[:3] == ["WORKER", "STATE", "PID"]
    data = json.loads(ctl(cfg.socket, "--json", "status", check=True).stdout)
    assert {w["state"] for w in data} == {"running"}
    pids = [w["pid"] for w in data]
    # The table for people (asked in the table form) and the maps for scripts agree.
    shown = {line.split()[0]: line.split()[2] for line in table.stdout.splitlines()[1:]}
    assert shown == {w["name"]: str(w["pid"]) for w in data}
    # One subtree of the partitions, unindented at its top.
    sub = ctl(cfg.socket, "partitions", "tenants/alpha", check=True).stdout.splitlines()
    assert sub[0] == "backend: portable" and sub[1].split()[0] == "PARTITION"
    assert [line.split()[0] for line in sub[2:]] == ["alpha"]
    every = ctl(cfg.socket, "partitions", check=True).stdout
    assert "bravo" in every and "alpha" in every
    missing = ctl(cfg.socket, "partitions", "tenants/nope")
    assert missing.returncode == 1 and "no partition 'tenants/nope'" in missing.stderr
    # SIGTERM: tenants stopped, socket removed, exit 0, no worker left behind.
    assert d.stop() == 0
    assert not cfg.socket.exists()
    for pid in pids:
        assert not pid_alive(pid)


def test_status_exit_code_when_a_worker_is_not_running(cfg: ConfigDir, daemon) -> None:
    beat_tenant(cfg, "alpha")
    cfg.write()
    daemon()
    ctl(cfg.socket, "stop", "alpha", check=True)
    res = ctl(cfg.socket, "status")
    assert res.returncode == 3 and "stopped" in res.stdout
    err = ctl(cfg.socket, "start", "nope")
    assert err.returncode == 1 and "no tenant named 'nope'" in err.stderr
    assert ctl(cfg.socket, "start", "alpha", "--wait", check=True).returncode == 0
    assert ctl(cfg.socket, "status").returncode == 0


def test_unreachable_daemon_exit_code(tmp_path: Path) -> None:
    res = ctl(tmp_path / "none.sock", "status")
    assert res.returncode == 4
    assert "none.sock" in res.stderr


def test_second_daemon_on_same_socket_refuses(cfg: ConfigDir, daemon) -> None:
    beat_tenant(cfg, "alpha")
    cfg.write()
    first = daemon()
    pid_before = json.loads(ctl(cfg.socket, "--json", "status").stdout)[0]["pid"]
    second = subprocess.run(
        [DAEMON, "--config", str(cfg.path)], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 3
    assert "already serving" in second.stderr
    # The first daemon and its tenant are untouched.
    assert ctl(cfg.socket, "ping").returncode == 0
    assert json.loads(ctl(cfg.socket, "--json", "status").stdout)[0]["pid"] == pid_before
    assert first.stop() == 0


def test_stale_socket_is_replaced(cfg: ConfigDir, daemon) -> None:
    import socket

    beat_tenant(cfg, "alpha")
    cfg.write()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(cfg.socket))
    s.close()  # a socket file with nobody behind it: what a crashed daemon leaves
    daemon()
    assert ctl(cfg.socket, "ping").stdout.strip() == "pong"


def test_stop_takes_down_grandchildren_that_left_the_session(
    cfg: ConfigDir, daemon, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # The worker's child calls setsid() (own session and process group), starts a
    # grandchild and exits: a group kill of the worker cannot reach the grandchild.
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        open({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"        os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "        while True: time.sleep(1)\n"
        "    os._exit(0)\n"
        "while True: time.sleep(1)\n"
    )
    cfg.tenant(
        "forker",
        f"""
        [[worker]]
        name = "main"
        command = {worker_py(code)}
        stop_timeout = 1
        """,
    )
    cfg.write()
    d = daemon()
    wait_until(pidfile.exists, 10, "the grandchild to start")
    grandchild = int(pidfile.read_text())
    # Re-parented to the daemon (child subreaper), not to init.
    wait_until(lambda: _ppid(grandchild) == d.proc.pid, 10, "re-parenting to the daemon")
    res = ctl(cfg.socket, "--json", "stop", "forker", check=True)
    assert json.loads(res.stdout)[0]["state"] == "stopped"
    # Killed, and reaped by the daemon: no process and no zombie left.
    wait_until(lambda: not os.path.exists(f"/proc/{grandchild}"), 10, "the grandchild to go")
    assert d.stop() == 0


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_check_lists_every_problem_with_file_and_key(cfg: ConfigDir, tmp_path: Path) -> None:
    cfg.partitions += (
        '[[partition]]\nname = "small"\nparent = "tenants"\nmemory = { max = "64MiB" }\n'
    )
    typo = cfg.tenant(
        "typo",
        """
        memroy = { max = "1GiB" }
        [[worker]]
        name = "w"
        command = ["true"]
        """,
    )
    toobig = cfg.tenant(
        "toobig",
        """
        parent = "tenants/small"
        memory = { max = "128MiB" }
        [[worker]]
        name = "w"
        command = ["true"]
        """,
    )
    broken = cfg.tenant("broken", "this is = = not toml\n")
    wrongtype = cfg.tenant(
        "wrongtype",
        """
        [[worker]]
        name = "w"
        command = "not-a-list"
        instances = "many"
        """,
    )
    # A valid tenant beside the broken ones: "nothing was started" must hold for it too.
    # Its worker leaves a mark the moment it runs.
    mark = tmp_path / "good-ran"
    good = f"good-{uuid.uuid4().hex[:6]}"
    cfg.tenant(
        good,
        f"""
        [[worker]]
        name = "w"
        command = {worker_py(f"open({str(mark)!r}, 'w').close()")}
        """,
    )
    cfg.write()
    res = subprocess.run(
        [DAEMON, "--config", str(cfg.path), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stdout + res.stderr
    # Exactly these problems, each on one line that starts with the file to edit; the
    # admission rule names both partitions and both numbers.
    problems = [
        f"{broken}: TOML syntax error: ",
        f"{typo}: memroy: unknown key ",
        f"{wrongtype}: worker[0].instances: ",
        f"{wrongtype}: worker[0].command: ",
        f"{toobig}: parent: 'tenants/small' is not 'hierarchical'",
        f"{toobig}: memory.max: max 128MiB of 'tenants/small/toobig' exceeds the max 64MiB "
        "in force at 'tenants/small'",
    ]

    def check_problems(stderr: str) -> None:
        lines = [line for line in stderr.splitlines() if line.startswith(str(cfg.root))]
        assert len(lines) == len(problems), stderr
        for start in problems:
            assert [line for line in lines if line.startswith(start)], (start, stderr)
        assert f"{len(problems)} problems; nothing was started." in stderr.splitlines()

    check_problems(res.stderr)
    # And starting for real refuses the same way, starting nothing: not the valid tenant,
    # not the control socket.
    res = subprocess.run(
        [DAEMON, "--config", str(cfg.path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stdout + res.stderr
    check_problems(res.stderr)
    assert not cfg.socket.exists()
    assert not mark.exists()
    assert not cfg.worker_log(good, "w-0").exists()


def test_check_prints_tree_and_enforcement(cfg: ConfigDir) -> None:
    beat_tenant(cfg, "alpha")
    cfg.write()
    res = subprocess.run(
        [DAEMON, "--config", str(cfg.path), "--check"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "backend: portable" in res.stdout
    assert "alpha (tenant)" in res.stdout and "128MiB" in res.stdout
    assert "memory.max         supervised" in res.stdout
    data = json.loads(
        subprocess.run(
            [DAEMON, "--config", str(cfg.path), "--check", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert data["ok"] and data["enforcement"]["memory.min"] == "none"


def test_example_config_checks_clean() -> None:
    res = subprocess.run(
        [DAEMON, "--config", str(REPO / "config" / "supervisord.toml"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert len([line for line in res.stdout.splitlines() if "(tenant)" in line]) >= 3


def test_help_teaches(tmp_path: Path) -> None:
    for cmd in (DAEMON, CTL):
        res = subprocess.run([cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "exit codes" in res.stdout and "example" in res.stdout


def test_ctl_starts_fast_without_trio() -> None:
    code = (
        "import sys, time; t=time.perf_counter();"
        "import supervisord_qnx.cli.ctl;"
        "print('trio' in sys.modules, 'pydantic' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["False", "False"]


def test_socket_garbage_leaves_the_daemon_and_its_tenants_intact(cfg: ConfigDir, daemon) -> None:
    """Hypothesis-generated bytes and malformed messages on the real daemon's socket: each
    gets an error response or a closed connection; tenants, other clients and logs go on."""
    import socket

    import msgpack
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from supervisord_qnx.control.client import Client

    beat_tenant(cfg, "alpha")
    cfg.write()
    daemon()
    before = json.loads(ctl(cfg.socket, "--json", "status", check=True).stdout)[0]
    steady = Client(cfg.socket, timeout=10)  # another client, connected throughout
    steady.connect()

    messages = st.one_of(
        st.binary(max_size=512),
        st.lists(
            st.none()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=8)
            | st.binary(max_size=8)
        ).map(lambda items: msgpack.packb(items)),
        st.tuples(
            st.integers(0, 2**32 - 1), st.text(max_size=12), st.integers(0, 9) | st.text()
        ).map(lambda t: msgpack.packb([0, t[0], t[1], t[2]])),
    )

    answered = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages)
    def poke(data: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(cfg.socket))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        if reply:  # an answer, if any, is a well-formed msgpack-RPC response
            msg = msgpack.unpackb(reply, raw=False, strict_map_key=False)
            assert msg[0] == 1 and (msg[2] is None or isinstance(msg[2]["code"], str))
            answered.append(msg[2]["code"] if msg[2] else None)
        assert steady.call("ping") == "pong"

    poke()
    steady.close()
    # Well-shaped requests with unknown methods or bad params were answered, not dropped.
    assert {"unknown_method", "bad_request"} & set(answered)
    after = json.loads(ctl(cfg.socket, "--json", "status", check=True).stdout)[0]
    assert after["pid"] == before["pid"] and after["state"] == "running"
    lines = ctl(cfg.socket, "--json", "logs", "alpha", "-n", "5", check=True)
    assert json.loads(lines.stdout)[0]["lines"][-1] == "beat"
