"""What a worker inherits: its stdin, stdout and stderr, nothing of the daemon's.

The daemon spawns its workers without a close loop in the child: it marks what it was
given close-on-exec at its start, and the kernel closes the rest at the ``exec``
(supervisord_qnx/fdhygiene.py; the loop was 0.6 ms of every restart at N = 1000). So a
descriptor the daemon's own parent left open and inheritable, the one thing Python does
not make close-on-exec by itself, must not reach a worker, first run or restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ConfigDir, cli_env, wait_until, worker_py
from tests.daemonproc import DAEMON, ctl

pytestmark = pytest.mark.integration

# Lists its open descriptors with what each is, into the file named by its argument,
# then sleeps. The listing's own descriptor is closed by the time readlink runs.
LISTER = (
    "import json, os, sys, time\n"
    "fds = {}\n"
    "for n in os.listdir('/proc/self/fd'):\n"
    "    try: fds[n] = os.readlink('/proc/self/fd/' + n)\n"
    "    except OSError: pass\n"
    "out = sys.argv[1] + '.' + str(os.getpid())\n"
    "open(out + '.tmp', 'w').write(json.dumps(fds)); os.rename(out + '.tmp', out)\n"
    "time.sleep(1000)\n"
)


def seen(root: Path) -> dict[int, dict[str, str]]:
    """Each run's listing, by its pid."""
    return {
        int(p.name.rsplit(".", 1)[1]): json.loads(p.read_text())
        for p in root.glob("fds.*")
        if not p.name.endswith(".tmp")
    }


@pytest.mark.parametrize("backend", ["portable", "cgroup1"])
def test_a_worker_inherits_no_descriptor_the_daemon_was_given(
    backend: str, cfg: ConfigDir, request: pytest.FixtureRequest
) -> None:
    extra = {}
    if backend == "cgroup1":
        extra["cgroup_root"] = request.getfixturevalue("cg").name
    cfg.write(backend=backend, **extra)
    out = cfg.root / "fds"
    # As a shell or service manager may leave one: open, inheritable, not for workers.
    given_r, given_w = os.pipe()
    os.set_inheritable(given_w, True)
    cfg.tenant(
        "lister",
        f'[[worker]]\nname = "w"\ncommand = {worker_py(LISTER)[:-1]}, "{out}"]\n',
    )
    log = open(cfg.root / "daemon.out", "w+")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [DAEMON, "--config", str(cfg.path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=cli_env(),
        pass_fds=(given_w,),
    )
    os.close(given_w)
    try:
        wait_until(lambda: len(seen(cfg.root)) == 1, 30, "the first run's listing")
        # A restart goes the same way as the first run: the daemon ends the run, the
        # restart policy starts it again.
        assert ctl(cfg.socket, "restart", "lister").returncode == 0
        wait_until(lambda: len(seen(cfg.root)) == 2, 30, "the second run's listing")
        runs = seen(cfg.root)
        for pid, fds in runs.items():
            assert sorted(fds) == ["0", "1", "2"], (pid, fds)
            assert fds["0"] == "/dev/null", fds
            assert fds["1"] == fds["2"] and fds["1"].startswith("pipe:"), fds
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
        os.close(given_r)


def test_seal_marks_what_was_inheritable_and_nothing_else() -> None:
    """In a child process (sealing is for good in the process that does it)."""
    code = (
        "import os, json\n"
        "from supervisord_qnx.fdhygiene import seal, sealed\n"
        "r, w = os.pipe(); os.set_inheritable(w, True)\n"
        "before = sealed(); n = seal()\n"
        "print(json.dumps([before, sealed(), n, os.get_inheritable(w),"
        " os.get_inheritable(1)]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, after, changed, w_inheritable, stdout_inheritable = json.loads(proc.stdout)
    assert (before, after) == (False, True)
    assert changed >= 1 and not w_inheritable
    # 0-2 are the process's own stdio and stay as they were.
    assert stdout_inheritable
