"""Seed-parity API (``partition.guard``) on the real cgroup v1 backend.

Builder → ``ManagedPartition`` (RAII), ``attach_process``/``detach_process``,
``PartitionGuard`` scoping ``guard.spawn``, and ``run``/``with_partition`` executing a
pickled callable in a child inside the partition - including one that blows the
partition's memory and must surface as ``PartitionMemoryExceeded`` without harming us.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervisord_qnx.partition import guard
from supervisord_qnx.partition.cgroup_v1 import Cgroup1Backend
from supervisord_qnx.partition.guard import (
    ManagedPartition,
    PartitionBuilder,
    PartitionConfigError,
    PartitionFlags,
    PartitionGuard,
    PartitionMemoryExceeded,
)
from tests import cgroup_helpers as helpers
from tests.cgroup_helpers import cleaned, require_cgroup1, unique_instance

MiB = 1 << 20


@pytest.fixture
def backend() -> Iterator[Cgroup1Backend]:
    require_cgroup1()
    with cleaned(Cgroup1Backend(instance=unique_instance("guard"))) as b:
        yield b


@pytest.fixture
def partition(backend: Cgroup1Backend) -> Iterator[ManagedPartition]:
    with (
        PartitionBuilder()
        .with_name("wasm_instance")
        .with_flags(PartitionFlags.MEMORY_ISOLATION)
        .with_memory_size(4 * MiB, 128 * MiB, 16 * MiB)
        .with_cpu(budget=10, maximum=50)
        .with_pids(32)
        .build(backend)
    ) as p:
        yield p


def capture(argv: list[str]) -> str:
    r, w = os.pipe()
    try:
        proc = guard.spawn(argv, stdout=w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    proc.wait(timeout=30)
    return out


def memory_cgroup(text: str) -> str:
    return next(line.split(":", 2)[2] for line in text.splitlines() if ":memory:" in line)


def test_builder_creates_and_close_removes(backend: Cgroup1Backend) -> None:
    p = (
        PartitionBuilder()
        .with_name("limited_instance")
        .with_flags(PartitionFlags.HIERARCHICAL)
        .with_memory_size(4 * MiB, 16 * MiB, 1 * MiB)
        .build(backend)
    )
    mem = backend._mem("limited_instance")
    assert int((mem / "memory.limit_in_bytes").read_text()) == 16 * MiB
    assert int((mem / "memory.soft_limit_in_bytes").read_text()) == 15 * MiB
    child = (
        PartitionBuilder()
        .with_name("inner")
        .with_parent(p)
        .with_memory_size(0, 8 * MiB, 0)
        .build(backend)
    )
    assert child.path == "limited_instance/inner"
    p.close()  # RAII: removes the child too
    assert not mem.exists()
    p.close()  # idempotent


def test_builder_rejects_what_admission_rejects(backend: Cgroup1Backend) -> None:
    with pytest.raises(PartitionConfigError, match="exceeds max"):
        PartitionBuilder().with_name("x").with_memory_size(8 * MiB, 4 * MiB, 0).build(backend)
    builder = PartitionBuilder().with_name("p").with_flags("hierarchical")
    with builder.with_memory_size(0, 16 * MiB, 0).build(backend) as p:
        with pytest.raises(PartitionConfigError, match="exceeds the max"):
            PartitionBuilder().with_name("big").with_parent(p).with_memory_size(
                0, 64 * MiB, 0
            ).build(backend)
        assert not (backend._mem("p") / "big").exists()
    with pytest.raises(PartitionConfigError, match="clashes"):
        PartitionBuilder().with_name("memory.x").build(backend)


def test_guard_scopes_spawn_and_restores_even_on_exception(
    partition: ManagedPartition,
) -> None:
    outside = memory_cgroup(capture(["cat", "/proc/self/cgroup"]))
    assert "supervisord-qnx" not in outside
    with PartitionGuard(partition) as p:
        assert guard.current_partition() is p
        inside = memory_cgroup(capture(["cat", "/proc/self/cgroup"]))
        assert inside.endswith("/wasm_instance/@guard")
    assert guard.current_partition() is None
    with pytest.raises(RuntimeError, match="boom"), PartitionGuard(partition):
        raise RuntimeError("boom")
    assert guard.current_partition() is None
    assert memory_cgroup(capture(["cat", "/proc/self/cgroup"])) == outside


async def test_guard_is_per_task(partition: ManagedPartition) -> None:
    seen: dict[str, object] = {}

    async def inside() -> None:
        with PartitionGuard(partition):
            await trio.sleep(0.05)
            seen["inside"] = guard.current_partition()

    async def outside() -> None:
        await trio.sleep(0.02)
        seen["outside"] = guard.current_partition()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inside)
        nursery.start_soon(outside)
    assert seen == {"inside": partition, "outside": None}


def test_attach_and_detach_process(partition: ManagedPartition) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        partition.attach_process(proc.pid)
        assert partition.pids() == [proc.pid]
        partition.detach_process(proc.pid)
        assert partition.pids() == []
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_run_returns_results_and_reraises(partition: ManagedPartition) -> None:
    assert partition.run(helpers.add, 2, 3) == 5
    where = memory_cgroup(partition.with_partition(helpers.whoami_cgroup))
    assert "/wasm_instance/@run-" in where
    with pytest.raises(ValueError, match="from the child") as info:
        partition.run(helpers.fail_with, "from the child")
    assert any("raised in partition 'wasm_instance'" in n for n in info.value.__notes__)


def test_run_that_exceeds_memory_raises_and_spares_the_caller(
    partition: ManagedPartition,
) -> None:
    # "Spares the caller": the allocation ran in a child inside the partition, and this
    # process was never moved into it (the OOM kill would otherwise be ours to suffer
    # next time, and our whole heap charged to the tenant).
    ours_before = memory_cgroup(Path("/proc/self/cgroup").read_text())
    assert "wasm_instance" not in ours_before
    with pytest.raises(PartitionMemoryExceeded, match="wasm_instance"):
        partition.run(helpers.allocate, 512)  # 4x the partition's 128 MiB
    assert memory_cgroup(Path("/proc/self/cgroup").read_text()) == ours_before
    assert partition.pids() == []
    assert partition.stats().oom_kills == 1
    assert partition.run(helpers.add, 1, 1) == 2  # still usable afterwards
    # Each run had its own leaf, released afterwards.
    mem = partition.backend._mem(partition.path)  # type: ignore[attr-defined]
    assert [d.name for d in mem.iterdir() if d.is_dir()] == []


async def test_run_from_trio_through_a_thread(partition: ManagedPartition) -> None:
    results = []

    async def one(n: int) -> None:
        results.append(await trio.to_thread.run_sync(partition.run, helpers.add, n, n))

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(one, n)
    assert sorted(results) == [0, 2, 4]
