"""The daemon as operators run it, in a subprocess, and the control CLI against it:
shared by every test that drives ``supervisord-qnx`` from outside."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ConfigDir, cli_env, wait_until

BIN = Path(sys.executable).parent
DAEMON = str(BIN / "supervisord-qnx")
CTL = str(BIN / "supervisorctl-qnx")


def ctl(sock: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [CTL, "--socket", str(sock), *args], capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ctl {args} -> {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def ctl_status(sock: Path) -> list[dict]:
    """``supervisorctl-qnx --json status`` as a script reads it. Exit 3 (it answered, and
    some worker is not running yet) is an answer: callers wait for the state they need."""
    proc = ctl(sock, "--json", "status")
    assert proc.returncode in (0, 3), f"status -> {proc.returncode}: {proc.stdout}{proc.stderr}"
    return list(json.loads(proc.stdout))


class DaemonProc:
    def __init__(self, cfg: ConfigDir, *extra: str) -> None:
        self.cfg = cfg
        self.log = open(cfg.root / "daemon.out", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [DAEMON, "--config", str(cfg.path), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
        wait_until(self.up, 30, "the daemon to answer ping")

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
        return ctl(self.cfg.socket, "ping").returncode == 0

    def output(self) -> str:
        self.log.flush()
        return (self.cfg.root / "daemon.out").read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        finally:
            if not self.log.closed:
                self.log.close()
        return code
