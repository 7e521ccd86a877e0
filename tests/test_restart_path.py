"""The restart after a worker's exit, through the real daemon (issue 14's restart path):
whatever the run left in its leaf is gone before the next run starts (a leaf the exit
left empty is not cleared again: ``test_daemon``'s SIGKILL test restarts through that
path). On the portable backend and on cgroup v1,
with the default restart policy's immediate restart of a healthy run (``backoff_max``
made short so that the test's run counts as healthy)."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from tests.conftest import ConfigDir, Running, pid_alive, worker_py

pytestmark = pytest.mark.integration

# Leaves a grandchild in its own session (out of the worker's process group, so the stop
# signal and the main process's death do not reach it), says its pid, and waits.
LEAVER = worker_py(
    "import subprocess, time\n"
    "p = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
    "print('left', p.pid, flush=True)\n"
    "time.sleep(1000)\n"
)


async def _start(backend: str, cfg: ConfigDir, start_daemon, request) -> Running:
    opts = {}
    if backend == "cgroup1":
        opts["cgroup_root"] = request.getfixturevalue("cg").name
    cfg.tenant(
        "leaver",
        f"""
        restart = {{ policy = "always", backoff_initial = 0.01, backoff_max = 0.2 }}
        [[worker]]
        name = "w"
        command = {LEAVER}
        """,
    )
    return await start_daemon(backend=backend, **opts)


async def _left_pid(cfg: ConfigDir, seen: int) -> int:
    """The grandchild pid of the ``seen + 1``-th run, from the worker's log."""
    log = cfg.worker_log("leaver", "w-0")
    with trio.fail_after(30):
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            left = [int(x.split()[1]) for x in lines if x.startswith("left ")]
            if len(left) > seen:
                return left[seen]
            await trio.sleep(0.02)


@pytest.mark.parametrize("backend", ["portable", "cgroup1"])
async def test_a_restart_starts_after_what_the_run_left_is_gone(
    backend: str, cfg: ConfigDir, start_daemon, request
) -> None:
    d = await _start(backend, cfg, start_daemon, request)
    first = await d.wait_for("leaver:w-0", lambda w: w["state"] == "running")
    grandchild = await _left_pid(cfg, 0)
    assert pid_alive(grandchild)
    await trio.sleep(0.3)  # past backoff_max: a healthy run, restarted at once
    os.kill(first["pid"], signal.SIGKILL)
    second = await d.wait_for(
        "leaver:w-0", lambda w: w["state"] == "running" and w["pid"] != first["pid"]
    )
    assert second["exit_reason"] == "signal:SIGKILL"
    # The clear-leaf comes before the spawn: by the time the new run is reported running,
    # the first run's grandchild is dead (at most a zombie the daemon has yet to reap).
    assert not pid_alive(grandchild)
    # The second run's own grandchild, in the same leaf, is left alone meanwhile.
    assert pid_alive(await _left_pid(cfg, 1))


# Its memory is in a grandchild of its own session, not in the worker: 96 MiB, over the
# tenant's 64 MiB max and under the RLIMIT_DATA (twice the max) the portable backend sets.
HOARDER = worker_py(
    "import subprocess, time\n"
    'code = \'import time; h = bytearray(96 << 20); h[::4096] = b"x" * len(h[::4096]); '
    "time.sleep(1000)'\n"
    "subprocess.Popen(['python3', '-c', code], start_new_session=True)\n"
    "time.sleep(1000)\n"
)


async def test_portable_accounting_counts_a_grandchild_without_a_scan(
    cfg: ConfigDir, start_daemon
) -> None:
    """The sampler reads the daemon's own trees (each worker and what is below it), not
    every process on the machine: what is below the worker counts all the same."""
    cfg.tenant(
        "hoarder",
        f"""
        memory = {{ max = "64MiB" }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {HOARDER}
        """,
    )
    d = await start_daemon(backend="portable")
    w = await d.wait_for("hoarder:w-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "memory-limit"
