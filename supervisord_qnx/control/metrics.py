"""The daemon's figures in Prometheus' text exposition format: the ``metrics`` control
method and the node_exporter textfile (``[daemon] metrics_textfile``).

Design points:

* **prometheus_client formats, we only count.** The library renders and escapes the
  exposition (``generate_latest``) and reads the daemon process's own figures
  (``ProcessCollector``: RSS, open descriptors). Everything else comes from one custom
  collector registered in a registry of our own (never the library's global one, which
  would drag in the library's own process and GC figures and outlive the daemon).
* **Read at scrape time.** Nothing is sampled in the background for metrics: each
  render asks the supervisor for its workers and the backend for each partition's
  figures, so a scrape shows what ``status`` and ``partitions`` would show at that
  moment (the same calls underneath).
* **Off the event loop.** A render reads many kernel files (cgroup counters, /proc), so
  the whole render runs in a worker thread (the daemon's ``blocking`` pool for slow
  control work). The supervisor's state belongs to the trio thread: the collector reads
  it there with one ``trio.from_thread.run_sync`` hop, then works on that copy.
* **Bounded labels.** Label values come from the configuration (tenant, worker,
  partition), the fixed state and error-code vocabularies, or exit reasons (one per
  worker); a method name a client made up is counted as ``unknown``, so a client cannot
  grow the series without bound.

Every metric, its type and labels: docs/metrics.md.
"""

from __future__ import annotations

import bisect
import os
import platform
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from supervisord_qnx import __version__
from supervisord_qnx.control.rpc import RpcError
from supervisord_qnx.partition.backend import Backend, Control, Enforcement, PartitionStats
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.supervise.supervisor import Supervisor
from supervisord_qnx.supervise.worker import State

# prometheus_client is imported at the first render, not with the daemon: its import is
# some 30 ms and a few MiB of a daemon that may never be asked for metrics (issue 14).
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )

log = structlog.get_logger("supervisord_qnx.metrics")

PREFIX = "supervisord_qnx"
# What ``generate_latest`` writes for our names (all plain ASCII ones): the classic text
# format. An HTTP bridge in front of the socket serves it with this Content-Type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Control request latency buckets, seconds: most calls answer in well under 10 ms; a
# ``start``/``stop`` with ``wait`` lasts as long as its workers take (stop_timeout).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip

# The label a made-up method name is counted under.
UNKNOWN_METHOD = "unknown"
# The code of a request whose handler was cancelled (its connection closed, or the
# daemon stopped) before it answered: no answer was sent.
CANCELLED = "cancelled"


class MetricsSource(Protocol):
    """What the metrics read of the daemon (the control methods' view of it)."""

    backend: Backend
    tree: PartitionTree
    supervisor: Supervisor
    io_backend: str


# --------------------------------------------------------------------------- requests


def error_code(exc: BaseException) -> str:
    """The protocol error code a handler's exception is answered with (the server's own
    rule: an ``RpcError``, possibly alone in an exception group, else ``internal``)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, RpcError):
        return str(exc.code)
    if isinstance(exc, trio.Cancelled):
        return CANCELLED
    return "internal"


class RequestStats:
    """Control requests counted by method and answer code, with latency histograms per
    method. Observed on the trio thread, read by a render thread: one lock."""

    def __init__(self, known: Callable[[str], bool]) -> None:
        self._known = known
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        # Per method: a count per bucket (not cumulative; the last one is +Inf), the sum.
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        label = method if self._known(method) else UNKNOWN_METHOD
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._counts[label, code] = self._counts.get((label, code), 0) + 1
            buckets = self._buckets.get(label)
            if buckets is None:  # not setdefault: its default list was made on every call
                buckets = self._buckets[label] = [0] * (len(LATENCY_BUCKETS) + 1)
            buckets[slot] += 1
            self._sums[label] = self._sums.get(label, 0.0) + seconds

    def families(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        with self._lock:
            counts = dict(self._counts)
            buckets = {m: list(b) for m, b in self._buckets.items()}
            sums = dict(self._sums)
        requests = CounterMetricFamily(
            f"{PREFIX}_control_requests",
            "Control requests answered, by method and answer code (ok or the error code).",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(counts.items()):
            requests.add_metric([method, code], n)
        latency = HistogramMetricFamily(
            f"{PREFIX}_control_request_duration_seconds",
            "Time from a control request's dispatch to its result (encoding and "
            "writing the answer excluded), by method.",
            labels=["method"],
        )
        # Python's float text is what Prometheus parses ("0.0005", "1.0").
        bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
        for method, per_bucket in sorted(buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, per_bucket, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            latency.add_metric([method], cumulative, sums[method])
        return [requests, latency]


# --------------------------------------------------------------------------- the collector


@dataclass(frozen=True)
class _Partition:
    path: str
    pids_limit: int | None


@dataclass(frozen=True)
class _Snapshot:
    """What the render needs from the trio thread, copied there in one go."""

    workers: list[dict[str, Any]]
    partitions: list[_Partition]
    backend: Backend
    io_backend: str
    adopted: int = 0


class _DaemonCollector:
    """The custom collector: the daemon's workers, partitions and requests, read at
    collect time. ``collect`` must run in a trio worker thread (see the module doc)."""

    def __init__(self, daemon: MetricsSource, requests: RequestStats) -> None:
        self._daemon = daemon
        self._requests = requests

    def _snapshot(self) -> _Snapshot:
        d = self._daemon
        # The pids limit only where something enforces it: a figure nothing applies would
        # read as a limit the tenant does not have.
        pids_enforced = d.backend.enforcement().get(Control.PIDS, Enforcement.NONE)
        partitions = [
            _Partition(
                node.path,
                node.effective_pids_max if pids_enforced is not Enforcement.NONE else None,
            )
            for node in d.tree
        ]
        return _Snapshot(
            d.supervisor.status(), partitions, d.backend, d.io_backend, d.supervisor.adopted
        )

    def collect(self) -> Iterator[Metric]:
        snap = trio.from_thread.run_sync(self._snapshot)
        yield from _daemon_families(snap)
        yield from _worker_families(snap.workers)
        yield from _partition_families(snap)
        yield from self._requests.families()


def _daemon_families(snap: _Snapshot) -> Iterable[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily(
        f"{PREFIX}_build_info",
        "Always 1; the daemon's version, Python, partition backend and trio I/O back end.",
        labels=["version", "python", "backend", "io"],
    )
    info.add_metric([__version__, platform.python_version(), snap.backend.name, snap.io_backend], 1)
    adopted = GaugeMetricFamily(
        f"{PREFIX}_adopted_workers",
        "Workers this daemon adopted from a previous instance (a SIGKILLed, crashed or "
        "re-executed daemon) at its start, instead of starting them.",
    )
    adopted.add_metric([], snap.adopted)
    return [info, adopted]


_WORKER_LABELS = ["tenant", "worker", "instance"]


def _worker_families(workers: list[dict[str, Any]]) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily(
        f"{PREFIX}_worker_state",
        "1 for the state each worker instance is in, 0 for every other state (one-hot).",
        labels=[*_WORKER_LABELS, "state"],
    )
    restarts = CounterMetricFamily(
        f"{PREFIX}_worker_restarts",
        "Restarts by policy since the daemon started (operator starts not counted).",
        labels=_WORKER_LABELS,
    )
    uptime = GaugeMetricFamily(
        f"{PREFIX}_worker_uptime_seconds",
        "Seconds since the current run started; only for running workers.",
        labels=_WORKER_LABELS,
    )
    last_exit = GaugeMetricFamily(
        f"{PREFIX}_worker_last_exit_info",
        "Always 1; how the worker's last run ended (as status' exit_reason), for "
        "workers that ended at least once.",
        labels=[*_WORKER_LABELS, "reason"],
    )
    states = [str(s) for s in State]
    for w in workers:
        labels = [w["tenant"], w["worker"], str(w["instance"])]
        for s in states:
            state.add_metric([*labels, s], 1 if w["state"] == s else 0)
        restarts.add_metric(labels, w["restarts"])
        if w.get("uptime") is not None:
            uptime.add_metric(labels, w["uptime"])
        if w.get("exit_reason") is not None:
            last_exit.add_metric([*labels, w["exit_reason"]], 1)
    return [state, restarts, uptime, last_exit]


def _partition_families(snap: _Snapshot) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_partition_{name}", doc, labels=["partition"])

    def counter(name: str, doc: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_partition_{name}", doc, labels=["partition"])

    readable = gauge("stats_readable", "1 if the partition's figures could be read, else 0.")
    mem = gauge("memory_current_bytes", "Memory in use by the partition's processes.")
    peak = gauge("memory_peak_bytes", "Highest memory use seen (kernel or sampled).")
    limit = gauge("memory_limit_bytes", "Memory cap in force (absent: none).")
    cpu = counter("cpu_usage_seconds", "CPU time used by the partition's processes.")
    throttled = counter("cpu_throttled_seconds", "Time the partition was held at its CPU max.")
    pids = gauge("pids_current", "Processes (tasks on cgroups) in the partition.")
    pids_limit = gauge("pids_limit", "Process cap in force, where the backend enforces one.")
    ooms = counter("oom_kills", "Processes the kernel killed at the partition's memory cap.")
    pressure = counter(
        "memory_pressure_events", "Times the partition's memory crossed max - reserved."
    )
    figures = snap.backend.stats_many([p.path for p in snap.partitions])
    for p in snap.partitions:
        s = figures.get(p.path)
        if not isinstance(s, PartitionStats):
            # One partition's failure (removed from outside, say) leaves the rest whole.
            log.debug("partition figures unreadable", partition=p.path, error=str(s))
            readable.add_metric([p.path], 0)
            continue
        readable.add_metric([p.path], 1)
        # None is "this backend cannot tell": the series is left out, never shown as 0.
        for family, value, scale in (
            (mem, s.memory_current, 1),
            (peak, s.memory_peak, 1),
            (limit, s.memory_limit, 1),
            (cpu, s.cpu_usage_ns, 1e-9),
            (throttled, s.cpu_throttled_ns, 1e-9),
            (pids, s.pids_current, 1),
            (pids_limit, p.pids_limit, 1),
            (ooms, s.oom_kills, 1),
            (pressure, s.memory_pressure_events, 1),
        ):
            if value is not None:
                family.add_metric([p.path], value * scale)
    return [readable, mem, peak, limit, cpu, throttled, pids, pids_limit, ooms, pressure]


class Exporter:
    """The daemon's metrics registry: request counts are fed by the control dispatch,
    everything else is read when rendered."""

    def __init__(self, daemon: MetricsSource, known_method: Callable[[str], bool]) -> None:
        self.requests = RequestStats(known_method)
        self._daemon = daemon
        self._registry: CollectorRegistry | None = None
        self._made = threading.Lock()  # two renders at once make one registry

    @property
    def registry(self) -> CollectorRegistry:
        """Made at the first render (prometheus_client is imported then)."""
        with self._made:
            if self._registry is None:
                from prometheus_client import CollectorRegistry, ProcessCollector

                registry = CollectorRegistry()
                # The daemon process itself: RSS, open and maximum descriptors, CPU, start
                # time (where /proc is Linux'; elsewhere the library reports nothing).
                ProcessCollector(namespace=PREFIX, registry=registry)
                registry.register(_DaemonCollector(self._daemon, self.requests))
                self._registry = registry
            return self._registry

    def render(self) -> str:
        """The exposition text. Blocking, and must run in a trio worker thread."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")


# --------------------------------------------------------------------------- the textfile


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the new one,
    whole, never a part: a temporary file in the same directory (not ``*.prom``, so
    node_exporter's collector never reads it half-written), fsync, rename, fsync the
    directory (so the rename itself survives a power cut)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash; O_EXCL below refuses anything there
    # 0644: node_exporter usually runs as another user than the daemon.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            data = text.encode("utf-8")
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


async def write_textfile(
    exporter: Exporter,
    path: Path,
    interval: float,
    blocking: Callable[[Callable[[], str]], Awaitable[str]],
) -> None:
    """Write the exposition to ``path`` now and every ``interval`` seconds, for the
    daemon's life. Never fatal: a failure is logged once (again only if the error
    changes), the daemon carries on, and the next interval tries again."""
    failing: str | None = None
    while True:
        began = time.monotonic()
        try:
            text = await blocking(exporter.render)
            # A hung filesystem must not hold up the daemon's shutdown: abandon the write.
            await trio.to_thread.run_sync(write_atomically, path, text, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - the textfile is never worth the daemon
            error = f"{type(exc).__name__}: {exc}"
            if error != failing:
                log.error(
                    "cannot write the metrics textfile; retrying every interval",
                    path=str(path),
                    error=error,
                    interval=interval,
                )
                failing = error
        else:
            if failing is not None:
                log.warning("metrics textfile written again", path=str(path))
                failing = None
        await trio.sleep(max(0.0, interval - (time.monotonic() - began)))
