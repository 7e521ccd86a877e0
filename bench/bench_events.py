"""``status`` latency of supervisord-qnx while live-events subscribers come and go.

The daemon runs as its own process (portable backend) with ``--tenants`` crash-looping
tenants (``/bin/false``, restarted after 1 ms, never fatal): a steady stream of state
and restart events. Over one connection, ``--calls`` back-to-back ``status`` calls are
timed in three phases:

* **no subscriber**: the event load alone;
* **stuck subscriber**: one client subscribes to everything and never reads again; its
  socket buffer fills, then its queue (``subscriber_queue``), then it is dropped;
* **reading subscriber**: one client subscribes and reads everything as it comes.

Also printed: events per second, the daemon's RSS before and after the stuck subscriber,
and what the stuck subscriber finds when it finally reads (events, ``overflow``, EOF).

    .venv/bin/python bench/bench_events.py [--tenants 3] [--calls 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from supervisord_qnx.control.client import Client

PROJECT_BIN = Path(sys.executable).parent

TENANT = """\
restart = { policy = "always", backoff_initial = 0.001, backoff_max = 0.001, \
max_restarts = 1000000000, window = 1 }
[[worker]]
name = "crash"
command = ["/bin/false"]
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def write_config(root: Path, tenants: int, queue: int) -> tuple[Path, Path]:
    sock = Path(tempfile.gettempdir()) / f"sqnx-bench-{uuid.uuid4().hex[:8]}.sock"
    (root / "tenants.d").mkdir()
    (root / "daemon.toml").write_text(
        "[daemon]\n"
        f'socket = "{sock}"\n'
        'state_dir = "state"\nlog_dir = "log"\n'
        'backend = "portable"\nenforcement = "best-effort"\n'
        'log_level = "warning"\n'
        f"subscriber_queue = {queue}\n"
        '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
    )
    for n in range(tenants):
        (root / "tenants.d" / f"crash{n}.toml").write_text(TENANT)
    return root / "daemon.toml", sock


def wait_up(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}")
        try:
            with Client(sock, timeout=1) as c:
                c.call("ping")
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the daemon did not answer within 30 s")


def last_seq(client: Client) -> int:
    last = client.call("events", limit=1)
    return int(last[-1]["seq"]) if last else 0


def time_status(client: Client, calls: int) -> dict[str, float]:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        client.call("status")
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "max_ms": max(samples) * 1000}


def raw_subscriber(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(sock))
    s.sendall(msgpack.packb([0, 1, "subscribe", []]))
    return s


def read_to_eof(s: socket.socket) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    out: list[Any] = []
    while data := s.recv(1 << 16):
        unpacker.feed(data)
        out.extend(unpacker)
    return out


def measure(tenants: int, calls: int, queue: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config, sock = write_config(Path(tmp), tenants, queue)
        proc = subprocess.Popen(
            [str(PROJECT_BIN / "supervisord-qnx"), "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        reading: Client | None = None
        thread: threading.Thread | None = None
        try:
            wait_up(sock, proc)
            time.sleep(1.0)  # let the crash loops get going
            out: dict[str, Any] = {"tenants": tenants, "calls": calls, "queue": queue}
            with Client(sock, timeout=30) as c:
                seq0, t0 = last_seq(c), time.monotonic()
                out["no_subscriber"] = time_status(c, calls)
                out["events_per_s"] = (last_seq(c) - seq0) / (time.monotonic() - t0)

                rss_before = rss_kib(proc.pid)
                stuck = raw_subscriber(sock)
                start = last_seq(c)
                # Its socket buffer holds a few hundred events; past that the daemon's
                # writer for it is blocked and its queue fills: time status then.
                while last_seq(c) < start + 400:
                    time.sleep(0.02)
                out["stuck_subscriber"] = time_status(c, calls)
                out["stuck_events_during"] = last_seq(c) - start
                # Make sure it overflowed: its queue plus what its socket buffer holds.
                while last_seq(c) < start + queue + 2000:
                    time.sleep(0.05)
                out["rss_kib"] = {"before": rss_before, "after": rss_kib(proc.pid)}
                messages = read_to_eof(stuck)
                stuck.close()
                notes = messages[1:]
                out["stuck_found"] = {
                    "events": sum(1 for m in notes if m[1] == "event"),
                    "overflow": next((m[2][0] for m in notes if m[1] == "overflow"), None),
                }

                reading = Client(sock, timeout=30)
                reading.subscribe()
                received = 0

                def drain(stream: Iterator[dict[str, Any]]) -> None:
                    nonlocal received
                    try:
                        for _ in stream:
                            received += 1
                    except OSError:
                        pass  # the daemon stopped: the end of the benchmark

                thread = threading.Thread(target=drain, args=(reading.stream(),), daemon=True)
                thread.start()
                out["reading_subscriber"] = time_status(c, calls)
                out["reading_received"] = received
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            sock.unlink(missing_ok=True)
        if thread is not None:
            thread.join(timeout=10)
        if reading is not None:
            reading.close()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=3, help="crash-looping tenants (default 3)")
    p.add_argument("--calls", type=int, default=500, help="status calls per phase (default 500)")
    p.add_argument("--queue", type=int, default=1024, help="subscriber_queue (default 1024)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = measure(args.tenants, args.calls, args.queue)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['tenants']} crash-looping tenants, {result['events_per_s']:.0f} events/s, "
        f"subscriber_queue {result['queue']}, {result['calls']} status calls per phase"
    )
    print(f"{'phase':<20} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("no_subscriber", "stuck_subscriber", "reading_subscriber"):
        r = result[phase]
        print(f"{phase:<20} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f}")
    rss = result["rss_kib"]
    found = result["stuck_found"]
    print(
        f"(the stuck phase ran from its 400th to its {result['stuck_events_during']}th "
        f"event: blocked, its queue of {result['queue']} filling)"
    )
    print(f"daemon RSS: {rss['before']} KiB before the stuck subscriber, {rss['after']} KiB after")
    print(
        f"stuck subscriber, when it read: {found['events']} events, then overflow "
        f"{found['overflow']}, then EOF; reading subscriber got {result['reading_received']}"
    )


if __name__ == "__main__":
    main()
