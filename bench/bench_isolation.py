"""Isolation: a worker ticking every 10 ms beside a CPU-and-memory hog in another tenant.

The ticker sleeps to each 10 ms tick and records how late it woke; the hog runs one CPU
spinner per CPU plus one more, and a process that allocates and touches memory in
64 MiB steps up to ``--hog-memory`` (then frees it and starts over). Measured for:

* **alone**: the ticker with no hog (the machine's own floor);
* **supervisord-qnx** on cgroup1: the hog's tenant has ``cpu.max`` (percent of the
  machine) and ``memory.max``; the ticker's tenant has a CPU budget. The hog is killed at
  its memory limit and restarted by its policy: its kills are counted;
* **supervisord-qnx, ticker fifo**: the same, and the ticker's worker also asks for
  ``sched = { policy = "fifo" }`` under a ``cpu.max`` of its own (docs/realtime.md's
  control-loop example): the partition's real-time runtime bounds it, and it preempts the
  hog's spinners the moment it wakes instead of waiting for CFS to choose it;
* **supervisord**: the same two programs with no partitions (it has none).

Reported: p50, p99 and max lateness of the ticker (ms), and the hog's kills.

    .venv/bin/python bench/bench_isolation.py [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COMPARE_VENV = HERE / ".venv-compare"
PROJECT_BIN = Path(sys.executable).parent
PERIOD = 0.010
LABEL_OURS = "supervisord-qnx (cgroup1)"
LABEL_RT = "supervisord-qnx, ticker fifo"

TICKER = r"""
import sys, time
period, until, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
late = []
nxt = time.monotonic() + period
while time.time() < until:
    time.sleep(max(0.0, nxt - time.monotonic()))
    late.append(time.monotonic() - nxt)
    nxt += period
    if late[-1] > period:  # skipped ticks are lateness already counted; realign
        nxt = time.monotonic() + period
with open(out + ".tmp", "w") as f:
    f.write("\n".join(f"{x:.6f}" for x in late))
import os
os.rename(out + ".tmp", out)
time.sleep(3600)
"""

HOG = r"""
import os, sys, time
spinners, limit = int(sys.argv[1]), int(sys.argv[2])
for _ in range(spinners):
    if os.fork() == 0:
        while True:
            pass
step = 64 << 20
while True:
    held = []
    while len(held) * step < limit:
        b = bytearray(step)
        for i in range(0, step, 4096):
            b[i] = 1
        held.append(b)
    del held
    time.sleep(0.05)
"""


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(path: Path, label: str, kills: int | None) -> dict[str, Any]:
    late = [float(x) for x in path.read_text().split()]
    return {
        "tool": label,
        "ticks": len(late),
        "p50_ms": pct(late, 0.5) * 1e3,
        "p99_ms": pct(late, 0.99) * 1e3,
        "max_ms": max(late) * 1e3,
        "hog_kills": kills,
    }


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result in {path}")
        time.sleep(0.2)


def programs(workdir: Path, seconds: float, hog_memory: int) -> tuple[list[str], list[str], Path]:
    # Our workers run as an unprivileged user by default (docs/security.md): they must
    # read the programs and write the result in this (mkdtemp: 0700) directory.
    workdir.chmod(0o1777)
    (workdir / "ticker.py").write_text(TICKER)
    (workdir / "hog.py").write_text(HOG)
    out = workdir / "lateness.txt"
    until = time.time() + 2.0 + seconds  # time for the daemon to start both
    ticker = [sys.executable, "-S", str(workdir / "ticker.py"), str(PERIOD), str(until), str(out)]
    spinners = (os.cpu_count() or 1) + 1
    hog = [sys.executable, "-S", str(workdir / "hog.py"), str(spinners), str(hog_memory)]
    return ticker, hog, out


def alone(workdir: Path, seconds: float) -> dict[str, Any]:
    ticker, _, out = programs(workdir, seconds, 0)
    proc = subprocess.Popen(ticker)
    try:
        wait_file(out, seconds + 30)
    finally:
        proc.kill()
        proc.wait()
    return summary(out, "alone (no hog)", None)


def ours(
    workdir: Path, seconds: float, hog_memory: int, hog_cpu: float, realtime: bool = False
) -> dict[str, Any]:
    from supervisord_qnx.control.client import Client

    ticker, hog, out = programs(workdir, seconds, hog_memory)
    sock = Path(f"/tmp/sqnx-iso-{uuid.uuid4().hex[:8]}.sock")
    (workdir / "tenants.d").mkdir()
    # fifo is admitted only under a cpu.max below the partition's CPUs (docs/realtime.md,
    # "Safety rails"); the ticker needs a fraction of one.
    cpu, sched = (
        ("cpu = { budget = 20, max = 20 }", 'sched = { policy = "fifo", priority = 50 }\n')
        if realtime
        else ("cpu = { budget = 50 }", "")
    )
    (workdir / "tenants.d" / "ticker.toml").write_text(
        f'{cpu}\n[[worker]]\nname = "t"\ncommand = {json.dumps(ticker)}\n{sched}'
    )
    (workdir / "tenants.d" / "hog.toml").write_text(
        f'cpu = {{ max = {hog_cpu} }}\nmemory = {{ max = "{hog_memory // 2 >> 20}MiB" }}\n'
        'restart = { policy = "always", backoff_initial = 0.05, max_restarts = 1000000 }\n'
        f'[[worker]]\nname = "h"\ncommand = {json.dumps(hog)}\n'
    )
    (workdir / "daemon.toml").write_text(
        f'[daemon]\nsocket = "{sock}"\nstate_dir = "state"\nlog_dir = "log"\n'
        f'backend = "cgroup1"\nlog_level = "warning"\n'
        f'cgroup_root = "sqnx-iso-{uuid.uuid4().hex[:8]}"\n'
        '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\ncpu = { budget = 100 }\n'
    )
    log = open(workdir / "daemon.out", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [str(PROJECT_BIN / "supervisord-qnx"), "--config", str(workdir / "daemon.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            wait_file(out, seconds + 60)
        except TimeoutError:
            raise TimeoutError((workdir / "daemon.out").read_text()[-3000:]) from None
        with Client(sock, timeout=30) as client:
            kills = next(w["restarts"] for w in client.call("status") if w["tenant"] == "hog")
            client.call("shutdown")
        daemon.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(60)
        log.close()
    return summary(out, LABEL_RT if realtime else LABEL_OURS, kills)


def supervisord(workdir: Path, seconds: float, hog_memory: int) -> dict[str, Any]:
    binary = COMPARE_VENV / "bin" / "supervisord"
    ctl = COMPARE_VENV / "bin" / "supervisorctl"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} missing (make bench-deps)")
    ticker, hog, out = programs(workdir, seconds, hog_memory)
    conf = workdir / "supervisord.conf"
    conf.write_text(
        f"[supervisord]\nnodaemon = true\nlogfile = {workdir}/supervisord.log\n"
        f"pidfile = {workdir}/supervisord.pid\nloglevel = warn\n"
        f"[unix_http_server]\nfile = {workdir}/s.sock\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[supervisorctl]\nserverurl = unix://{workdir}/s.sock\n"
        f"[program:ticker]\ncommand = {' '.join(ticker)}\nstartsecs = 0\n"
        f"[program:hog]\ncommand = {' '.join(hog)}\nstartsecs = 0\nstopasgroup = true\n"
        "killasgroup = true\n"
    )
    daemon = subprocess.Popen([str(binary), "-c", str(conf)])
    try:
        wait_file(out, seconds + 60)
    finally:
        subprocess.run([str(ctl), "-c", str(conf), "shutdown"], capture_output=True)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    return summary(out, "supervisord (no partitions)", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hog-memory", type=int, default=1 << 30, help="bytes the hog cycles")
    ap.add_argument("--hog-cpu", type=float, default=50.0, help="hog tenant's cpu.max, %%")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    runs: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("alone", lambda d: alone(d, args.seconds)),
        ("ours", lambda d: ours(d, args.seconds, args.hog_memory, args.hog_cpu)),
        ("ours-rt", lambda d: ours(d, args.seconds, args.hog_memory, args.hog_cpu, True)),
        ("supervisord", lambda d: supervisord(d, args.seconds, args.hog_memory)),
    ]
    skipped = []
    for name, run in runs:
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-iso-{name}-"))
        try:
            results.append(run(workdir))
        except (FileNotFoundError, PermissionError) as exc:
            skipped.append({"tool": name, "reason": str(exc)})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"results": results, "skipped": skipped}))
        return 0
    print(f"ticker every {PERIOD * 1e3:g} ms for {args.seconds:g} s beside a hog; lateness in ms")
    print(f"{'':<30}{'ticks':>8}{'p50':>9}{'p99':>9}{'max':>9}{'hog kills':>11}")
    for r in results:
        kills = "-" if r["hog_kills"] is None else str(r["hog_kills"])
        print(
            f"{r['tool']:<30}{r['ticks']:>8}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['max_ms']:>9.2f}{kills:>11}"
        )
    by = {r["tool"]: r for r in results}
    b = by.get("supervisord (no partitions)")
    for label in (LABEL_OURS, LABEL_RT):
        a = by.get(label)
        if a and b and a["p99_ms"] > 0:
            print(f"p99 lateness, supervisord / {label} = {b['p99_ms'] / a['p99_ms']:.1f}x")
    for s in skipped:
        print(f"skipped {s['tool']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
