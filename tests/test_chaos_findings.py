"""Daemon bugs the chaos soak (tests/soak) found, each pinned down by a test that needs no
chaos: the real daemon in process, with the one interleaving the soak hit made certain."""

from __future__ import annotations

import time
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
