"""What one worker's log writer costs: started (its own ``python -I -S logwriter.py``)
against forked by the pre-started writer server (supervise/logserver.py).

For each way, ``--writers`` writers are started one after another, as the daemon does
(``logpipe.start_writer`` in this process, which makes itself a child subreaper as the
daemon does), each on its own pipe and log. Measured:

* **start**: from the call until a line written into the fresh pipe is in the file
  (p50 / p95 / max), i.e. until the writer is up and writing;
* **call**: how long the call itself takes (the daemon's thread is busy that long);
* **RSS / PSS per writer** with all of them alive (``/proc/<pid>/smaps_rollup``), and the
  server's own;
* **CPU per writer**: user + system time of the writers (and the server) over the run,
  divided by the number of writers.

    .venv/bin/python bench/bench_logwriter.py [--writers 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from supervisord_qnx.supervise import logpipe
from supervisord_qnx.supervise.logserver import ServerClient
from supervisord_qnx.supervise.reaper import ChildReaper, become_subreaper


def mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(way: str, count: int, root: Path) -> dict[str, Any]:
    reaper = ChildReaper()
    server = None
    if way == "forked":
        server = ServerClient(reaper)
        server.start()
    settings = logpipe.LogSettings(1 << 20, 3)
    writers: list[logpipe.Writer] = []
    starts, calls = [], []
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for i in range(count):
            leaf = f"w-{i}"
            path = logpipe.log_path(root, "bench", leaf)
            t0 = time.perf_counter()
            writer = logpipe.start_writer(reaper, root, "bench", leaf, settings, server)
            calls.append(time.perf_counter() - t0)
            os.write(writer.fd, b"hello\n")
            while path.stat().st_size == 0:
                time.sleep(0.0002)
            starts.append(time.perf_counter() - t0)
            writers.append(writer)
        pids = [w.pid for w in writers]
        mems = [mem(p) for p in pids]
        cpu_writers = sum(cpu(p) for p in pids)
        server_mem = mem(server.pid) if server is not None and server.pid else (0, 0)
        server_cpu = cpu(server.pid) if server is not None and server.pid else 0.0
    finally:
        for w in writers:
            w.close()
        for w in writers:
            os.waitpid(w.pid, 0)
        if server is not None:
            server.close()
            if server.pid:
                os.waitpid(server.pid, 0)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ms = 1000.0
    return {
        "way": way,
        "writers": count,
        "start_p50_ms": statistics.median(starts) * ms,
        "start_p95_ms": pct(starts, 0.95) * ms,
        "start_max_ms": max(starts) * ms,
        "call_p50_ms": statistics.median(calls) * ms,
        "rss_per_writer_mib": statistics.median(m[0] for m in mems) / 2**20,
        "pss_per_writer_mib": statistics.median(m[1] for m in mems) / 2**20,
        "pss_all_writers_mib": sum(m[1] for m in mems) / 2**20,
        "server_rss_mib": server_mem[0] / 2**20,
        "server_pss_mib": server_mem[1] / 2**20,
        "cpu_per_writer_ms": (cpu_writers + server_cpu) / count * ms,
        "cpu_reaped_per_writer_ms": reaped_cpu / count * ms,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--writers", type=int, default=100)
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()
    if not become_subreaper():
        raise SystemExit("needs PR_SET_CHILD_SUBREAPER (Linux): forked writers are our children")
    results = []
    for way in ("started", "forked"):
        root = Path(tempfile.mkdtemp(prefix="sqnx-bench-logwriter-"))
        try:
            results.append(measure(way, opts.writers, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if opts.json:
        print(json.dumps(results, indent=2))
        return
    keys = [k for k in results[0] if k != "way"]
    print(f"{'':28}" + "".join(f"{r['way']:>12}" for r in results))
    for k in keys:
        print(f"{k:28}" + "".join(f"{r[k]:12.2f}" for r in results))


if __name__ == "__main__":
    main()
