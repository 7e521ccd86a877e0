"""What one ``status`` reply costs the daemon, in CPU time, at N workers: the packed and
reused rows (control/statusrows.py) against building every row's dict and encoding it,
in one process, one after the other.

Why CPU time of the process (its threads too: the old path read sched in one) and not
wall time: the machine this runs on is shared, and a wall-clock figure measures the
other suites as much as the code.
``bench_supervisor.py`` gives the round trip a client sees; this gives the daemon's
share of it. Both paths run against the same live daemon (portable backend, N
``sleep`` workers in N tenants), in the same trio run, alternately.

    .venv/bin/python bench/bench_status.py --count 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from supervisord_qnx.config.load import load
from supervisord_qnx.control.methods import Methods
from supervisord_qnx.control.report import with_sched
from supervisord_qnx.control.rpc import encode_response
from supervisord_qnx.daemon import Daemon, admit, configure_logging, make_backend

TENANT = """autostart = true
[[worker]]
name = "w"
command = ["sleep", "1000"]
"""

# Times ``ping``, full ``status`` and ``status`` with two fields on one connection
# (medians, ms); run as a separate process, as a user's client is.
PROBE = """
import json, statistics, sys, time
from supervisord_qnx.control.client import Client
c = Client(sys.argv[1], timeout=60)
out = {}
two = {"fields": ["name", "state"]}
for name, params in (("ping", {}), ("status", {}), ("status_fields", two)):
    method = name.split("_")[0]
    xs = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        c.call(method, **params)
        xs.append(time.perf_counter() - t)
    out[f"wall_{name}_ms"] = round(statistics.median(xs) * 1e3, 3)
print(json.dumps(out))
"""


def write_config(root: Path, count: int) -> Path:
    (root / "tenants.d").mkdir()
    for i in range(count):
        (root / "tenants.d" / f"t{i:04}.toml").write_text(TENANT)
    config = root / "daemon.toml"
    config.write_text(
        "[daemon]\n"
        f'socket = "/tmp/sqnx-bstat-{uuid.uuid4().hex[:8]}.sock"\n'
        'state_dir = "state"\nlog_dir = "log"\nbackend = "portable"\n'
        'enforcement = "best-effort"\nlog_level = "warning"\n'
        '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
    )
    return config


async def measure(count: int, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sqnx-bstat-") as tmp:
        config = load(write_config(Path(tmp), count))
        backend = make_backend(config)
        tree, warnings = admit(config, backend)
        d = Daemon(config, backend, tree, warnings)
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            methods = Methods(d)  # the daemon's own table is built the same way
            sup = d.supervisor
            with trio.fail_after(120):
                while sum(w["state"] == "running" for w in sup.status()) < count:
                    await trio.sleep(0.05)

            async def dicts() -> bytes:
                # What status did before: every row's dict, sched from the pool, encoded.
                await sup.refresh_counters()
                rows = sup.status() + d.jobs.status()
                await with_sched(rows, d.blocking)
                return encode_response(1, rows)

            async def packed() -> bytes:
                return encode_response(1, await methods.status({}))

            async def sched_only() -> bytes:
                # The part of ``packed`` that reads the kernel: four syscalls per pid.
                live = [i.lc.pid for t in sup.tenants.values() for i in t.instances if i.lc.pid]
                methods.status_rows.sched.read(live)
                return b""

            cost: dict[str, list[float]] = {"dicts": [], "packed": [], "sched": []}
            size = {}
            for _ in range(calls):
                for name, fn in (("dicts", dicts), ("packed", packed), ("sched", sched_only)):
                    t = time.process_time()
                    size[name] = len(await fn())
                    cost[name].append(time.process_time() - t)
            # The round trip a client sees, from another process: ``ping`` is the floor
            # (socket, dispatch, access check), ``status`` what it adds at N.
            probe = await trio.run_process(
                [sys.executable, "-c", PROBE, str(config.daemon.socket), str(calls)],
                capture_stdout=True,
            )
            wall = json.loads(probe.stdout)
            d.request_shutdown()
        out: dict[str, Any] = {"count": count, "bytes": size["packed"], "load": os.getloadavg()[0]}
        for name, xs in cost.items():
            out[f"{name}_ms"] = round(statistics.median(xs) * 1e3, 3)
        out.update(wall)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    configure_logging(level="warning")
    for count in args.count:
        print(json.dumps(trio.run(measure, count, args.calls)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
