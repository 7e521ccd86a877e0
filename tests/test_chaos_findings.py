"""Daemon bugs the chaos soak (tests/soak) found, each pinned down by a test that needs no
chaos: the real daemon in process, with the one interleaving the soak hit made certain."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import ConfigDir

pytestmark = pytest.mark.integration


def partition_paths(report: dict[str, Any]) -> set[str]:
    out, stack = set(), [report["tree"]]
    while stack:
        node = stack.pop()
        out.add(node["path"])
        stack.extend(node["children"])
    return out


async def test_jobs_started_and_ended_during_a_set_keep_their_partitions_right(
    cfg: ConfigDir, start_daemon
) -> None:
    """``set`` works on a copy of the partition tree and swaps it in after writing the
    new figures to the backend. A job started during that write lost its partition from
    the tree (its task then failed: ``internal: KeyError: 'jobs/job-N'``), and a job that
    ended during it came back as a ghost partition. The backend write is slowed down
    here, as a loaded machine did in the soak."""
    cfg.partitions += '\n[[partition]]\nname = "jobs"\nmemory = { max = "256MiB" }\n'
    cfg.tenant("alpha", '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon()
    backend = d.daemon.backend
    write = backend.update_limits

    def slow_write(partition: Any) -> None:
        time.sleep(1.0)  # in the daemon's pool for slow backend work
        write(partition)

    backend.update_limits = slow_write
    ending = await d.call("run", partition="jobs", command=["sleep", "0.3"])
    replies: dict[str, Any] = {}

    async def set_limits() -> None:
        replies["set"] = await d.call("set", partition="tenants/alpha", pids=50)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(set_limits)
            await trio.sleep(0.3)  # the set is writing now
            replies["run"] = await d.call("run", partition="jobs", command=["sleep", "1"])
        started = replies["run"]
        assert started["state"] == "running", started
        assert partition_paths(await d.call("partitions")) >= {started["partition"]}
        assert ending["partition"] not in partition_paths(await d.call("partitions"))
        done = await d.call("job", id=started["job"], wait=10)
    assert done["exit_reason"] == "exit:0", done
    assert started["partition"] not in partition_paths(await d.call("partitions"))


def env_tenant(cfg: ConfigDir, generation: int, memory: str) -> None:
    cfg.tenant(
        "alpha",
        f"""
        memory = {{ max = "{memory}" }}
        [[worker]]
        name = "w"
        env = {{ GENERATION = "{generation}" }}
        command = ["sleep", "1000"]
        """,
    )


def slow_resizes(d: Any) -> None:
    """Resizes take a second: a reload that replaces a worker and resizes its partition
    is then, for that second, between retiring the old instance and starting the new."""
    backend = d.daemon.backend
    write = backend.update_limits

    def slow_write(partition: Any) -> None:
        time.sleep(1.0)
        write(partition)

    backend.update_limits = slow_write


async def reload_with(d: Any, call: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Reload, and make ``call`` while the reload is half-way; both answers."""
    replies: dict[str, Any] = {}

    async def reload() -> None:
        replies["reload"] = await d.call("reload")

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(reload)
            await trio.sleep(0.4)
            replies["call"] = await d.call(call[0], **call[1])
    return replies


async def test_a_start_during_a_reload_that_replaces_the_worker_is_answered_and_holds(
    cfg: ConfigDir, start_daemon
) -> None:
    """The soak's hang: a reload retires the instances of a changed worker, then resizes
    and creates partitions, then puts the new instances in place. A ``start`` in between
    asked the retired instance, whose task had ended: ``start --wait`` never answered,
    and the new instance stayed stopped though a start was the last thing asked."""
    env_tenant(cfg, 0, "128MiB")
    d = await start_daemon()
    await d.call("stop", tenant="alpha", wait=True)
    slow_resizes(d)
    env_tenant(cfg, 1, "96MiB")
    replies = await reload_with(d, ("start", {"tenant": "alpha", "wait": True}))
    assert replies["reload"]["restarted"]["names"] == ["alpha:w"]
    w = await d.wait_for("alpha:w-0", lambda w: w["state"] == "running", timeout=10)
    assert b"GENERATION=1" in await program_environ(w["pid"])


async def program_environ(pid: int, timeout: float = 10.0) -> list[bytes]:
    """The worker program's environment. ``running`` comes with the pid, which execs
    through its wrappers (attach shim, setpriv) into the program: while an exec is in
    progress the kernel shows an empty environ, so wait until there is one."""
    with trio.fail_after(timeout):
        while True:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            if environ:
                return environ.split(b"\0")
            await trio.sleep(0.01)


async def test_a_stop_during_a_reload_that_replaces_the_worker_holds(
    cfg: ConfigDir, start_daemon
) -> None:
    """The same window the other way: a ``stop`` went to the retired instance (already
    stopped), and the reload then started the replacement: the tenant ran though a stop
    was the last thing asked."""
    env_tenant(cfg, 0, "128MiB")
    d = await start_daemon()
    await d.wait_for("alpha:w-0", lambda w: w["state"] == "running")
    slow_resizes(d)
    env_tenant(cfg, 1, "96MiB")
    await reload_with(d, ("stop", {"tenant": "alpha"}))
    await trio.sleep(0.5)  # a replacement started by mistake would be running by now
    w = await d.worker("alpha:w-0")
    assert (w["state"], w["pid"]) == ("stopped", None), w
