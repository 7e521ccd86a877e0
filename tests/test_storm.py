"""A storm of operator calls against the real daemon while its workers crash, ignore
SIGTERM and get SIGKILLed: every request is answered, the daemon keeps serving, the
untouched tenant keeps its pid, and afterwards ``status`` matches the kernel.

Runs on the portable backend and on cgroup v1 (real cgroups, unique root per test)."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import pytest
import trio

from supervisord_qnx.control.client import AsyncClient
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, pid_alive, pipelined, worker_py

pytestmark = pytest.mark.integration

CLIENTS = 8
ROUNDS = 12
TARGETS = ("crash", "stub", "healthy")
STUBBORN = worker_py(
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n"
)


def write_tenants(cfg: ConfigDir) -> None:
    cfg.tenant(
        "crash",
        """
        [restart]
        policy = "always"
        backoff_initial = 0.02
        backoff_max = 0.1
        max_restarts = 100000
        window = 1
        [[worker]]
        name = "w"
        command = ["sh", "-c", "sleep 0.05; exit 1"]
        """,
    )
    cfg.tenant(
        "stub",
        f"""
        [[worker]]
        name = "w"
        instances = 2
        stop_timeout = 0.3
        command = {STUBBORN}
        """,
    )
    for name in ("healthy", "untouched"):
        cfg.tenant(name, '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')


def random_call(rng: random.Random) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"tenant": rng.choice(TARGETS)}
    if rng.random() < 0.5:
        params["wait"] = rng.random() < 0.5
    return rng.choice(("start", "stop", "restart")), params


def zombies_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def unanswered(calls: list[tuple[str, dict[str, Any]]], answers: list[Any]) -> list[str]:
    """Every call without an answer, or answered with an error."""
    out = []
    for call, answer in zip(calls, answers, strict=True):
        if answer is None:
            out.append(f"no answer to {call}")
        elif answer[2] is not None:
            out.append(f"error answer to {call}: {answer[2]}")
    return out


async def storm(d: Any, seed: int) -> tuple[int, list[str]]:
    """Run the clients and the killer; return (requests sent, problems seen)."""
    sent = 0
    problems: list[str] = []
    done = trio.Event()

    async def client(n: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 100 + n)
        for _ in range(ROUNDS):
            if rng.random() < 0.4:
                calls = [random_call(rng) for _ in range(rng.randint(2, 5))]
                sent += len(calls)
                answers = await trio.to_thread.run_sync(pipelined, d.socket, calls)
                problems.extend(unanswered(calls, answers))
            else:
                method, params = random_call(rng)
                sent += 1
                async with AsyncClient(d.socket) as c:
                    try:
                        await c.call(method, **params)
                    except Exception as exc:  # noqa: BLE001 - every failure is a finding
                        problems.append(f"{method} {params}: {exc!r}")
            await trio.sleep(rng.random() * 0.05)

    async def killer() -> None:
        rng = random.Random(seed)
        while not done.is_set():
            running = [
                w
                for w in await d.call("status")
                if w["tenant"] in TARGETS and w["state"] == "running" and w["pid"]
            ]
            if running:
                victim = rng.choice(running)["pid"]
                try:
                    os.kill(victim, signal.SIGKILL)  # a worker the daemon started for us
                except ProcessLookupError:
                    pass
            await trio.sleep(0.05)

    with trio.fail_after(180):
        async with trio.open_nursery() as n:
            n.start_soon(killer)
            async with trio.open_nursery() as clients:
                for i in range(CLIENTS):
                    clients.start_soon(client, i)
            done.set()
    return sent, problems


def partition_usage(report: dict[str, Any]) -> dict[str, Any]:
    usage = {}
    stack = [report["tree"]]
    while stack:
        node = stack.pop()
        usage[node["path"]] = node["usage"]
        stack.extend(node["children"])
    return usage


async def check_against_kernel(d: Any, backend: str, cg_root: CgroupRoot | None) -> None:
    """Settle every target (stop two, start one) and compare ``status`` with the kernel."""
    with trio.fail_after(30):
        for name in ("crash", "stub"):
            for w in await d.call("stop", tenant=name, wait=True):
                assert (w["state"], w["pid"]) == ("stopped", None), w
        healthy = await d.call("start", tenant="healthy", wait=True)
    assert healthy[0]["state"] == "running"
    status = {w["name"]: w for w in await d.call("status")}
    for w in status.values():
        if w["state"] == "running":
            assert pid_alive(w["pid"]), w
    # On cgroup v1 a worker's exec shim moves itself into its leaf just after the daemon
    # has its pid (and calls it running): give the newly started one that moment.
    want = {f"tenants/{n}": [status[f"{n}:w-0"]["pid"]] for n in ("healthy", "untouched")}
    with trio.fail_after(10):
        while True:
            usage = partition_usage(await d.call("partitions"))
            if all(usage[path]["pids"] == pids for path, pids in want.items()):
                break
            await trio.sleep(0.02)
    for name in ("crash", "stub"):
        assert usage[f"tenants/{name}"]["pids"] == [], usage[f"tenants/{name}"]
    for name in ("healthy", "untouched"):
        assert usage[f"tenants/{name}"]["pids"] == [status[f"{name}:w-0"]["pid"]]
    if cg_root is not None:
        for name in ("crash", "stub"):
            memdir = cg_root.dir("memory", "tenants", name)
            procs = [p for d in memdir.rglob("cgroup.procs") for p in d.read_text().split()]
            assert procs == [], f"{name}: {procs}"
        leaf = cg_root.dir("memory", "tenants", "healthy", "@w-0", "cgroup.procs")
        assert str(status["healthy:w-0"]["pid"]) in leaf.read_text().split()
    with trio.fail_after(5):
        while zombies_of(os.getpid()):
            await trio.sleep(0.05)


@pytest.fixture(params=["portable", "cgroup1"])
def backend_root(request: pytest.FixtureRequest) -> tuple[str, CgroupRoot | None]:
    """Set up before ``start_daemon``, so a cgroup root is checked after the daemon ends."""
    if request.param == "cgroup1":
        return "cgroup1", request.getfixturevalue("cg")
    return "portable", None


async def test_storm_of_calls_and_kills(
    backend_root: tuple[str, CgroupRoot | None], cfg: ConfigDir, start_daemon
) -> None:
    backend, cg_root = backend_root
    write_tenants(cfg)
    opts = {"cgroup_root": cg_root.name} if cg_root is not None else {}
    d = await start_daemon(backend=backend, **opts)
    untouched = await d.worker("untouched:w-0")
    sent, problems = await storm(d, seed=7)
    assert problems == []
    assert sent >= CLIENTS * ROUNDS
    assert await d.call("ping") == "pong"
    assert (await d.worker("untouched:w-0"))["pid"] == untouched["pid"]
    await check_against_kernel(d, backend, cg_root)
