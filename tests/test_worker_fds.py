"""What a worker inherits: its stdin, stdout and stderr, nothing of the daemon's.

``SpawnRequest.popen_kwargs`` promises "only the fds it is given". Python makes every
descriptor it opens close-on-exec, but not what the daemon itself was given: a
descriptor its parent (a shell, a service manager) left open and inheritable. The close
loop in the child keeps that out of the workers, first run and restart alike; dropping it
(measured for issue 14's restart figure: no faster) must fail here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
