"""Hypothesis against a live daemon's control socket: random bytes, random msgpack values,
requests to every served method with random params, and byte- and value-level mutations
of valid requests, each on a real connection. The daemon must never fall over: every
reply is a well-formed msgpack-RPC response (or the connection is closed), no reply is
``internal`` (that code means a handler raised something unexpected: a daemon bug), and
a well-behaved client on its own connection keeps answering meanwhile.

One daemon (a subprocess, as operators run it) serves the whole module. To extend: add a
strategy to ``REQUESTS`` or a method to ``PARAM_NAMES``; ``exchange`` checks any bytes."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisord_qnx.control.client import Client
from tests.conftest import ConfigDir, worker_py
from tests.daemonproc import DaemonProc

pytestmark = pytest.mark.integration

# Methods whose effects reach beyond the daemon are fuzzed with their dangerous params
# defused (see ``defuse``); shutdown is never sent (it ends the daemon by design).
NEVER = {"shutdown"}
# Named params each method knows (methods.py), so random requests often get past the
# "unknown parameter" check and into the handlers' own code.
PARAM_NAMES: dict[str, list[str]] = {
    "ping": [],
    "version": [],
    "status": ["tenant"],
    "partitions": [],
    "start": ["tenant", "wait"],
    "stop": ["tenant", "wait"],
    "restart": ["tenant", "wait"],
    "logs": ["tenant", "worker", "lines"],
    "attach": ["partition", "pid", "own"],
    "detach": ["pid"],
    "events": ["limit", "kind", "topics", "tenants"],
    "metrics": [],
    "run": [
        *("partition", "command", "wasm", "args", "memory", "cpu", "pids", "timeout"),
        *("wait", "env", "cwd"),
    ],
    "job": ["id", "offset", "wait"],
    "reload": ["dry_run"],
    "set": ["partition", "memory", "cpu", "pids"],
    "subscribe": ["topics", "tenants"],
    "unsubscribe": [],
}
# The fuzzed tenant, and one nothing may touch: its worker keeps its pid throughout.
FUZZED, KEPT = "alpha", "keep"
BEAT = worker_py("import time\nwhile True: print('beat', flush=True); time.sleep(0.2)")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from(["alpha", "tenants/alpha", "alpha:beat-0", "beat", "64MiB", "", "tenants"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["max", "min", "budget"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)
# Maps with keys msgpack can carry but the protocol refuses (ints, bytes, bools).
odd_keys = st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=4) | st.booleans()
odd_maps = st.dictionaries(odd_keys, scalars, min_size=1, max_size=3)


big_ints = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 - 1])
sizes = big_ints | st.sampled_from(["64MiB", "1KiB", "0", "-1MiB", "1e99GiB", "", "max", "nan"])
numbers = big_ints | st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 1e308])
names = st.text(max_size=10) | st.sampled_from([FUZZED, "job", "beat", "alpha:beat-0", "..", "@x"])
# A value of the type each param wants (most of the time), so that requests get past the
# type checks into the handlers; random values of any type fill the rest.
TYPED: dict[str, st.SearchStrategy[Any]] = {
    "tenant": names,
    "worker": names,
    "partition": names | st.sampled_from([f"tenants/{FUZZED}", f"tenants/{FUZZED}/x"]),
    "wait": st.booleans() | numbers,
    "lines": big_ints,
    "limit": big_ints,
    "pid": big_ints,
    "own": st.booleans(),
    "kind": names,
    "topics": st.lists(names, max_size=3),
    "tenants": st.lists(names, max_size=3),
    "id": big_ints,
    "offset": big_ints,
    "dry_run": st.booleans(),
    "memory": sizes
    | st.dictionaries(st.sampled_from(["min", "max", "reserved"]), sizes | st.none()),
    "cpu": numbers | st.dictionaries(st.sampled_from(["budget", "max"]), numbers | st.none()),
    "pids": big_ints | st.none(),
    "timeout": numbers,
    "command": st.lists(st.text(max_size=5), max_size=2),
    "args": st.lists(st.text(max_size=5), max_size=2),
    "wasm": st.text(max_size=10),
    "cwd": st.sampled_from(["/", "/nonexistent", "relative", ""]),
    "env": st.dictionaries(st.text(max_size=5), st.text(max_size=5) | big_ints, max_size=2),
}


@st.composite
def method_requests(draw: st.DrawFn) -> list[Any]:
    """``[0, msgid, method, [params]]`` with a served method (or a random name) and params
    mixing its own names with random ones, each bound to a random value."""
    method = draw(st.sampled_from(sorted(PARAM_NAMES)) | st.text(max_size=10))
    names = PARAM_NAMES.get(method, [])
    keys: list[Any] = draw(
        st.lists(st.sampled_from(names) if names else st.text(max_size=6), max_size=4)
    )
    # Now and then a name of no method, or one that is not a str (bytes keys decode).
    keys += draw(st.lists(st.text(max_size=6) | st.binary(max_size=4), max_size=1))
    params = {k: draw(TYPED.get(k, values) if draw(st.integers(0, 4)) else values) for k in keys}
    shape = draw(st.sampled_from(["named", "named", "named", "empty", "random"]))
    wire: Any = [params] if shape == "named" else [] if shape == "empty" else draw(values)
    return [0, draw(st.integers(0, 2**32 - 1)), method, wire]


def defuse(msg: Any) -> Any:
    """Keep a random request's effects inside the daemon and this test's tenants."""
    request = isinstance(msg, list) and len(msg) == 4 and msg[0] == 0
    if not (request and isinstance(msg[2], str) and isinstance(msg[3], list)):
        return msg
    if msg[3] and isinstance(msg[3][0], dict):
        p = dict(msg[3][0])
        # Never the other tenant, the root or the shared parent: their workers must stay.
        for key in ("tenant", "partition"):
            if p.get(key) in (KEPT, f"tenants/{KEPT}", "", "/", "tenants"):
                p[key] = FUZZED
        if msg[2] == "attach" and isinstance(p.get("pid"), int) and 0 < p["pid"] < 2**31:
            # attach would move a real process of this machine: only impossible pids.
            p["pid"] = -p["pid"]
        if msg[2] == "run" and isinstance(p.get("command"), list):
            p["command"] = ["true"]  # a random argv could be any program on this machine
        if msg[2] == "run" and "wasm" in p:
            p["wasm"] = "/nonexistent/x.wasm"
        if msg[2] == "job" and not isinstance(p.get("wait"), bool):
            p["wait"] = 0  # a long wait only slows the test down
        msg = [*msg[:3], [p]]
    if msg[2] in NEVER:
        msg = [*msg[:2], "ping", msg[3]]
    return msg


def mutate_bytes(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, delete, insert or duplicate bytes of an encoded request."""
    out = bytearray(data)
    for op, pos, byte in edits:
        if not out:
            break
        i = pos % len(out)
        if op == 0:
            out[i] = byte
        elif op == 1:
            del out[i]
        elif op == 2:
            out.insert(i, byte)
        else:
            out[i:i] = out[i : i + 1 + byte % 8]
    return bytes(out)


VALID = [
    [0, 1, "status", [{"tenant": FUZZED}]],
    [0, 2, "logs", [{"tenant": FUZZED, "lines": 3}]],
    [0, 3, "events", [{"limit": 5, "topics": ["state"]}]],
    [0, 4, "set", [{"partition": f"tenants/{FUZZED}", "memory": {"max": "128MiB"}}]],
    [0, 5, "restart", [{"tenant": FUZZED}]],
]
# Encoded with its params' fields mutated one at a time (the stream stays in sync).
value_mutants = st.tuples(st.sampled_from(VALID), st.integers(0, 3), values).map(
    lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]]
)
byte_mutants = st.tuples(
    st.sampled_from(VALID).map(lambda m: msgpack.packb(m, use_bin_type=True)),
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 200), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
).map(lambda t: mutate_bytes(*t))


def packed(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda v: msgpack.packb(defuse(v), use_bin_type=True))


REQUESTS: dict[str, st.SearchStrategy[bytes]] = {
    "bytes": st.binary(max_size=1024),
    "values": packed(values | odd_maps),
    "methods": st.lists(packed(method_requests()), min_size=1, max_size=4).map(b"".join),
    "mutated values": packed(value_mutants),
    "mutated bytes": byte_mutants,
}


class Steady:
    """A well-behaved client on one connection throughout, calling ``status`` every 20 ms
    in its own thread; it keeps every latency and every failure."""

    def __init__(self, path: Any) -> None:
        self.client = Client(path, timeout=10)
        self.client.connect()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.client.call("status")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - began)
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConfigDir, DaemonProc]]:
    cfg = ConfigDir(tmp_path_factory.mktemp("fuzz"))
    for name in (FUZZED, KEPT):
        cfg.tenant(
            name,
            f"""
            memory = {{ max = "256MiB" }}
            restart = {{ policy = "always", backoff_initial = 0.05 }}
            [[worker]]
            name = "beat"
            stop_timeout = 2
            command = {BEAT}
            """,
        )
    cfg.write()
    d = DaemonProc(cfg)
    try:
        yield cfg, d
    finally:
        if d.proc.poll() is None:
            d.stop()
        cfg.socket.unlink(missing_ok=True)


def exchange(path: Any, data: bytes) -> list[Any]:
    """Send ``data`` on a fresh connection, half-close, and decode everything sent back.
    Fails the test if the reply is not a sequence of well-formed responses."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed first (a fatal frame): a valid outcome
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # closed with our unread bytes still queued: a closed connection
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(reply)
    out = []
    for msg in unpacker:
        # A response: [1, msgid, error, result], error nil or {"code": str, "message": str}.
        assert isinstance(msg, list) and len(msg) == 4 and msg[0] == 1, msg
        assert isinstance(msg[1], int) and 0 <= msg[1] < 2**32, msg
        error = msg[2]
        if error is not None:
            assert isinstance(error, dict), msg
            assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
            assert msg[3] is None, msg
            # "internal" means a handler raised something unexpected: a daemon bug.
            assert error["code"] != "internal", (data, msg)
        out.append(msg)
    assert unpacker.tell() == len(reply), f"torn reply: {reply!r}"
    return out


def kept_worker(cfg: ConfigDir, timeout: float = 30.0) -> dict[str, Any]:
    """The kept tenant's worker once it runs: the daemon serves its socket before its
    autostart is done, so the first test of the module may ask before it has a pid."""
    deadline = time.monotonic() + timeout
    with Client(cfg.socket, timeout=10) as c:
        while True:
            w = next(w for w in c.call("status") if w["tenant"] == KEPT)
            if (w["state"] == "running" and w["pid"]) or time.monotonic() > deadline:
                return w
            time.sleep(0.05)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_socket_input_never_breaks_the_daemon(
    kind: str, live: tuple[ConfigDir, DaemonProc]
) -> None:
    cfg, d = live
    kept = kept_worker(cfg)
    steady = Steady(cfg.socket)
    codes: list[str | None] = []

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(REQUESTS[kind])
    def poke(data: bytes) -> None:
        for msg in exchange(cfg.socket, data):
            codes.append(msg[2]["code"] if msg[2] else None)
        assert d.proc.poll() is None, d.output()

    try:
        poke()
    finally:
        steady.close()
    assert d.proc.poll() is None, d.output()
    assert steady.failures == []
    assert len(steady.latencies) >= 3
    # Generous: the machine is shared; the point is "still answering", not a benchmark.
    assert max(steady.latencies) < 5, steady.latencies
    lat = sorted(steady.latencies)
    print(
        f"{kind}: {len(codes)} answers {sorted(set(map(str, codes)))}; steady status "
        f"p50 {statistics.median(lat) * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
    )
    after = kept_worker(cfg)
    assert (after["pid"], after["state"]) == (kept["pid"], "running")
    assert "Traceback" not in d.output()
