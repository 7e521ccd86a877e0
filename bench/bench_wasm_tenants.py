"""WebAssembly tenants through the real daemon: start latency and memory per worker.

    .venv/bin/python bench/bench_wasm_tenants.py [--tenants 20] [--backend auto] [--json]

Starts ``supervisord-qnx`` as a subprocess on a temporary config with N wasm
tenants (heartbeat.wat, ``autostart = false``, each in its own partition of
64 MiB), then, one tenant at a time so the figures are latency and not
contention:

* ``cold``: the daemon's compiled-module cache (``<state_dir>/wasm-cache``) is
  emptied before each start, so every runner compiles with Cranelift;
* ``cached``: the same starts again with the cache warm (deserialize only);
* ``prefork-cold`` / ``prefork-cached``: the same two, through the daemon's
  pre-initialised start (``wasm_prefork = true``, the wasm fork server of
  docs/wasm.md section 7): each worker is forked from a process that has imported
  wasmtime and the runner, attaches itself, then runs the runner's ``main``.
  The plain rows run the daemon with ``wasm_prefork = false``.
* ``preinit-proto``: *not through the daemon*: the earlier prototype, a process
  that has also built the engine and forks a child that only instantiates and
  runs (no attach, no runner): a floor for the fork-server rows.

Latency: from just before the ``start`` request on the control socket to the
first guest line appearing in the worker's log file (polled every 0.5 ms). So it
includes the RPC round trip (about a millisecond) and is an upper bound on
spawn -> first line. Memory, with all N cached workers running at once: each
runner's ``VmRSS`` and ``Pss`` (proportional share: what it costs once pages
shared with the other runners are split among them) from /proc, and on a
cgroup backend the partition's own ``memory_current`` (cgroup1
``memory.usage_in_bytes``: RSS plus the page cache charged to it).

Targets from the issue: cached p50 <= 30 ms and <= 25 MiB per worker;
pre-initialised p50 <= 10 ms. The table says whether each is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisord_qnx.control.client import Client  # noqa: E402

HEARTBEAT = ROOT / "config" / "wasm" / "heartbeat.wat"
DAEMON = str(Path(sys.executable).parent / "supervisord-qnx")
MIB = 1 << 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))  # nearest rank
    return ordered[rank - 1]


def write_config(root: Path, tenants: int, backend: str, prefork: bool) -> tuple[Path, Path]:
    sock = Path(f"/tmp/sqnx-bench-{uuid.uuid4().hex[:8]}.sock")
    (root / "tenants.d").mkdir(parents=True)
    (root / "daemon.toml").write_text(
        "[daemon]\n"
        f'socket = "{sock}"\nstate_dir = "state"\nlog_dir = "log"\n'
        f'backend = "{backend}"\nenforcement = "best-effort"\nlog_level = "warning"\n'
        f'cgroup_root = "sqnx-bench-{os.getpid()}"\n'
        f"wasm_prefork = {'true' if prefork else 'false'}\n"
        '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
    )
    for i in range(tenants):
        (root / "tenants.d" / f"w{i:02}.toml").write_text(
            'autostart = false\nmemory = { max = "64MiB" }\n'
            'restart = { policy = "never" }\n'
            f'[[worker]]\nname = "beat"\nwasm = "{HEARTBEAT}"\n'
        )
    return root / "daemon.toml", sock


def wait_first_line(path: Path, t0: float, timeout: float = 30.0) -> float:
    """ms from ``t0`` until ``path`` holds a complete line."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            with open(path, "rb") as f:
                if b"\n" in f.read(256):
                    return (time.perf_counter() - t0) * 1000
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise SystemExit(f"no output in {path} after {timeout}s")


def proc_figures(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, Pss) in KiB, None where unreadable."""
    rss = pss = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def partition_usage(report: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}

    def walk(node: dict[str, Any]) -> None:
        usage = node.get("usage") or {}
        if usage.get("memory_current") is not None:
            out[node["path"]] = usage["memory_current"]
        for child in node.get("children", []):
            walk(child)

    walk(report["tree"])
    return out


def run_daemon_scenarios(tenants: int, backend: str, prefork: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sqnx-bench-"))
    config, sock = write_config(tmp, tenants, backend, prefork)
    proc = subprocess.Popen(
        [DAEMON, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "daemon.err", "wb"),  # noqa: SIM115 - lives as long as the daemon
    )
    client = Client(sock, timeout=60)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.call("ping")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((tmp / "daemon.err").read_text()) from None
                time.sleep(0.05)
        names = [f"w{i:02}" for i in range(tenants)]
        log = tmp / "log"
        cache_dir = tmp / "state" / "wasm-cache"
        backend_name = client.call("version")["backend"]

        def start_all(cold: bool) -> list[float]:
            times = []
            for name in names:
                client.call("stop", tenant=name, wait=True)
                (log / "tenants" / name / "beat-0.log").unlink(missing_ok=True)
                if cold:
                    shutil.rmtree(cache_dir, ignore_errors=True)
                t0 = time.perf_counter()
                client.call("start", tenant=name)
                times.append(wait_first_line(log / "tenants" / name / "beat-0.log", t0))
            return times

        cold = start_all(cold=True)
        cached = start_all(cold=False)
        time.sleep(1.0)  # let every runner settle after its first beats
        status = {w["tenant"]: w for w in client.call("status")}
        per_proc = [proc_figures(status[n]["pid"]) for n in names if status[n]["pid"]]
        rss = [r for r, _ in per_proc if r is not None]
        pss = [p for _, p in per_proc if p is not None]
        usage = partition_usage(client.call("partitions"))
        part = [usage[f"tenants/{n}"] for n in names if f"tenants/{n}" in usage]
        loads = []
        for n in names:
            rpt = tmp / "state" / "wasm" / f"{n}.beat-0.report"
            for line in rpt.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "started":
                    loads.append(event["load_ms"])
        return {
            "backend": backend_name,
            "cold_ms": cold,
            "cached_ms": cached,
            "runner_load_ms": loads,
            "rss_kib": rss,
            "pss_kib": pss,
            "partition_bytes": part,
        }
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the pre-initialised prototype ---------------------------------------------------------

_PREINIT = r"""
import os, sys, time
import wasmtime
from supervisord_qnx.wasm import cache

engine = wasmtime.Engine(wasmtime.Config())
cache_dir = cache.open_cache_dir(sys.argv[2])
source = open(sys.argv[1], "rb").read()
cache.load_module(engine, source, "fuel=0,epoch=0", cache_dir)  # warm the cache
print("ready", flush=True)
for line in sys.stdin:
    log = line.strip()
    pid = os.fork()
    if pid == 0:
        # The child: in the real design it would first attach itself to its partition
        # (cgroup.procs, rlimits), then setsid and point fd 1/2 at its log; only then
        # does it touch the tenant's module.
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2)
        module, _ = cache.load_module(engine, source, "fuel=0,epoch=0", cache_dir)
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig(); wasi.inherit_stdout(); wasi.inherit_stderr()
        store.set_wasi(wasi)
        linker = wasmtime.Linker(engine); linker.define_wasi()
        linker.instantiate(store, module).exports(store)["_start"](store)
        os._exit(0)
    print(pid, flush=True)
"""


def run_preinit_proto(starts: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sqnx-preinit-"))
    server = subprocess.Popen(
        [sys.executable, "-c", _PREINIT, str(HEARTBEAT), str(tmp / "cache")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert server.stdin is not None and server.stdout is not None
    times, pids = [], []
    try:
        assert server.stdout.readline().strip() == "ready"
        for i in range(starts):
            log = tmp / f"p{i}.log"
            t0 = time.perf_counter()
            server.stdin.write(f"{log}\n")
            server.stdin.flush()
            pids.append(int(server.stdout.readline()))
            times.append(wait_first_line(log, t0))
        time.sleep(0.5)
        figures = [proc_figures(p) for p in pids]
        return {
            "preinit_ms": times,
            "rss_kib": [r for r, _ in figures if r is not None],
            "pss_kib": [p for _, p in figures if p is not None],
        }
    finally:
        for p in pids:
            try:
                os.killpg(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.kill()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def row(name: str, times: list[float], rss: list[int], pss: list[int]) -> dict[str, Any]:
    return {
        "scenario": name,
        "runs": len(times),
        "p50_ms": round(pct(times, 50), 1),
        "p95_ms": round(pct(times, 95), 1),
        "rss_mib": round(statistics.median(rss) / 1024, 1) if rss else None,
        "pss_mib": round(statistics.median(pss) / 1024, 1) if pss else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=20)
    ap.add_argument("--backend", default="auto", help="daemon backend (auto: as the daemon)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    opts = ap.parse_args()

    d = run_daemon_scenarios(opts.tenants, opts.backend, prefork=False)
    f = run_daemon_scenarios(opts.tenants, opts.backend, prefork=True)
    p = run_preinit_proto(opts.tenants)
    rows = [
        row("cold", d["cold_ms"], [], []),
        row("cached", d["cached_ms"], d["rss_kib"], d["pss_kib"]),
        row("prefork-cold", f["cold_ms"], [], []),
        row("prefork-cached", f["cached_ms"], f["rss_kib"], f["pss_kib"]),
        row("preinit-proto", p["preinit_ms"], p["rss_kib"], p["pss_kib"]),
    ]
    part = d["partition_bytes"]
    partition_mib = round(statistics.median(part) / MIB, 1) if part else None
    fpart = f["partition_bytes"]
    prefork_partition_mib = round(statistics.median(fpart) / MIB, 1) if fpart else None
    cached, prefork = rows[1], rows[3]
    targets = {
        "cached_p50_le_30ms": cached["p50_ms"] <= 30,
        "cached_rss_le_25mib": cached["rss_mib"] is not None and cached["rss_mib"] <= 25,
        "preinit_p50_le_10ms": prefork["p50_ms"] <= 10,
    }
    result = {
        "backend": d["backend"],
        "tenants": opts.tenants,
        "python": sys.version.split()[0],
        "rows": rows,
        "runner_load_ms_median": round(statistics.median(d["runner_load_ms"]), 1),
        "partition_memory_mib_median": partition_mib,
        "prefork_partition_memory_mib_median": prefork_partition_mib,
        "prefork_runner_load_ms_median": round(statistics.median(f["runner_load_ms"]), 1),
        "targets_met": targets,
        "raw": {"daemon": d, "prefork": f, "preinit": p},
    }
    if opts.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{opts.tenants} wasm tenants (heartbeat.wat), backend {d['backend']}")
    header = f"{'scenario':<15}{'runs':>5}{'p50 ms':>9}{'p95 ms':>9}{'RSS MiB':>9}{'PSS MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['scenario']:<15}{r['runs']:>5}{r['p50_ms']:>9}{r['p95_ms']:>9}"
            f"{r['rss_mib'] or '-':>9}{r['pss_mib'] or '-':>9}"
        )
    print(f"runner's own load_ms (import -> _start), cached: {result['runner_load_ms_median']}")
    print(f"same, prefork-cached (fork -> _start): {result['prefork_runner_load_ms_median']}")
    if partition_mib is not None:
        print(f"partition memory_current per cached worker (median): {partition_mib} MiB")
    if prefork_partition_mib is not None:
        print(f"same, prefork-cached: {prefork_partition_mib} MiB")
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
