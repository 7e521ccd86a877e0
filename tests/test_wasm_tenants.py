"""WebAssembly tenants through the real daemon: real wasmtime runners spawned by the
supervisor in their partitions, observed as a user would (status over the socket, the
per-worker log files, the runner's report, ``--check``).

The modules are the examples in ``config/wasm``. Timing bounds are generous: the
machine has 2 cores shared with other test runs.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from supervisord_qnx.supervise.launch import WASM_RUNNER_OVERHEAD
from supervisord_qnx.wasm import cache, outcome
from tests import cgroup_helpers as cg
from tests.conftest import REPO, ConfigDir, pid_alive

pytestmark = pytest.mark.integration

WASM = REPO / "config" / "wasm"
MIB = 1 << 20
BIN = Path(sys.executable).parent

# Tenant names are unique per test session: the portable backend finds a leaf's
# processes by their environment tag alone, system-wide, so two test sessions
# running at once on this machine (other engineers, CI) with equal tenant and worker
# names would stop each other's workers.
RUN = uuid.uuid4().hex[:6]
GROWER, BEAT, OOB, SPIN, UNLINKED, CMD = (
    f"{n}-{RUN}" for n in ("grower", "beat", "oob", "spin", "unlinked", "cmd")
)

# Fast, bounded restarts so that trap/deadline loops settle within a test.
QUICK_RESTART = 'restart = { policy = "on-failure", backoff_initial = 0.01, backoff_max = 0.05, '


def wasm_tenant(
    cfg: ConfigDir,
    name: str,
    module: Path | str,
    *,
    worker: str = "w",
    memory_max: str = "128MiB",
    limits: str = "",
    restart: str = 'restart = { policy = "never" }',
) -> None:
    cfg.tenant(
        name,
        f"""
        memory = {{ max = "{memory_max}" }}
        {restart}
        [[worker]]
        name = "{worker}"
        wasm = "{module}"
        [worker.limits]
        {limits}
        """,
    )


async def wait_for_line(path: Path, needle: str, timeout: float = 15.0) -> str:
    """The first line of the log file containing ``needle`` (polls the file)."""
    with trio.fail_after(timeout):
        while True:
            if path.exists():
                for line in path.read_text(errors="replace").splitlines():
                    if needle in line:
                        return line
            await trio.sleep(0.02)


def report_of(d, tenant: str, leaf: str) -> dict:
    sup = d.daemon.supervisor
    (inst,) = [i for i in sup.tenant(tenant).instances if i.leaf == leaf]
    return outcome.read_report(sup.launchers.wasm.report_path(inst.target))


async def started_event(d, tenant: str, leaf: str, timeout: float = 15.0) -> dict:
    """The runner's ``started`` event of the current run ("running" in status only means
    the process exists; the module is loaded a little later)."""
    with trio.fail_after(timeout):
        while (started := report_of(d, tenant, leaf)["started"]) is None:
            await trio.sleep(0.02)
    return started


# -- limits from inside: memory ------------------------------------------------------------


async def test_grower_is_denied_at_its_linear_memory_cap_and_keeps_running(
    cfg: ConfigDir, start_daemon
) -> None:
    # The partition cannot be 16 MiB: it holds the whole runner process (interpreter +
    # wasmtime, ~28 MiB resident, 35 MiB while compiling) besides the module. The
    # *module* gets 16 MiB from the engine; the partition is the outer wall.
    wasm_tenant(cfg, GROWER, WASM / "grower.wat", memory_max="96MiB", limits='memory = "16MiB"')
    d = await start_daemon()
    log = cfg.worker_log(GROWER, "w-0")
    granted = await wait_for_line(log, "granted ")
    assert int(granted.split()[1]) <= 16 * MIB
    first = await d.wait_for(f"{GROWER}:w-0", lambda w: w["memory_denied"] > 0)
    assert first["state"] == "running"
    # It keeps retrying (one page every 100 ms) and keeps being refused, not killed.
    await wait_for_line(log, "alive 10")
    later = await d.wait_for(f"{GROWER}:w-0", lambda w: w["memory_denied"] > first["memory_denied"])
    assert later["state"] == "running" and later["pid"] == first["pid"]
    assert later["restarts"] == 0 and pid_alive(later["pid"])
    # The operator's view: the denial count in the exit-reason column.
    res = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [str(BIN / "supervisorctl-qnx"), "--socket", str(cfg.socket), "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    )
    row = next(line for line in res.stdout.splitlines() if line.startswith(f"{GROWER}:w-0"))
    assert "running" in row and "memory.grow denied" in row, res.stdout


async def test_default_linear_memory_cap_is_partition_max_less_runner_overhead(
    cfg: ConfigDir, start_daemon
) -> None:
    # No [worker.limits] memory: the cap comes from the partition's 64 MiB max.
    wasm_tenant(cfg, GROWER, WASM / "grower.wat", memory_max="64MiB")
    await start_daemon()
    granted = await wait_for_line(cfg.worker_log(GROWER, "w-0"), "granted ")
    assert int(granted.split()[1]) == 64 * MIB - WASM_RUNNER_OVERHEAD == 24 * MIB


async def test_grower_under_cgroup1_stays_inside_its_kernel_partition(
    cfg: ConfigDir, start_daemon
) -> None:
    cg.require_cgroup1()
    wasm_tenant(cfg, GROWER, WASM / "grower.wat", memory_max="96MiB", limits='memory = "16MiB"')
    d = await start_daemon(backend="cgroup1", cgroup_root=cg.unique_instance("wasm"))
    log = cfg.worker_log(GROWER, "w-0")
    granted = await wait_for_line(log, "granted ")
    assert int(granted.split()[1]) <= 16 * MIB
    w = await d.wait_for(f"{GROWER}:w-0", lambda w: w["memory_denied"] > 0)
    # The runner is inside the tenant's memory cgroup (attached before exec).
    cgroups = Path(f"/proc/{w['pid']}/cgroup").read_text()
    assert f"/tenants/{GROWER}" in cgroups, cgroups
    await wait_for_line(log, "alive 5")
    stats = d.daemon.backend.stats(f"tenants/{GROWER}")
    assert stats.memory_current is not None and stats.memory_current < 96 * MIB
    assert not stats.oom_kills
    after = await d.worker(f"{GROWER}:w-0")
    assert after["state"] == "running" and after["pid"] == w["pid"]


# -- traps, deadlines ---------------------------------------------------------------------


async def test_trap_is_the_exit_reason_and_the_restart_policy_applies(
    cfg: ConfigDir, start_daemon
) -> None:
    wasm_tenant(
        cfg,
        OOB,
        WASM / "oob.wat",
        restart=QUICK_RESTART + "max_restarts = 2, window = 60 }",
    )
    d = await start_daemon()
    w = await d.wait_for(f"{OOB}:w-0", lambda w: w["state"] == "fatal")
    assert w["exit_reason"].startswith("trap: "), w
    assert "out of bounds" in w["exit_reason"]
    assert w["restarts"] == 2
    # The guest's own output and the runner's trap message are both in its log.
    text = cfg.worker_log(OOB, "w-0").read_text()
    assert text.count("about to write out of bounds") == 3
    assert "wasm trap:" in text


@pytest.mark.parametrize(
    ("limits", "why", "stopped_by"),
    [
        ("timeout = 0.5", "timeout", outcome.STOPPED_BY_EPOCH),
        ("fuel = 20_000_000", "fuel exhausted", outcome.STOPPED_BY_FUEL),
    ],
)
async def test_spinner_is_stopped_by_its_deadline(
    cfg: ConfigDir, start_daemon, limits: str, why: str, stopped_by: str
) -> None:
    wasm_tenant(cfg, SPIN, WASM / "spinner.wat", limits=limits)
    d = await start_daemon()
    w = await d.wait_for(f"{SPIN}:w-0", lambda w: w["state"] == "exited", timeout=30)
    assert w["exit_reason"] == "deadline"
    # The engine trapped the spinner (it never calls the host): the runner's grace
    # exit, which also says "deadline", would be a deadline that does not work.
    report = outcome.read_report(cfg.root / "state" / "wasm" / f"{SPIN}.w-0.report")
    assert report["exit"]["stopped_by"] == stopped_by
    assert f"wasm runner: deadline ({why})\n" in cfg.worker_log(SPIN, "w-0").read_text()


async def test_unrunnable_module_goes_fatal_without_a_restart_loop(
    cfg: ConfigDir, start_daemon
) -> None:
    # Valid WebAssembly (so the config loads) that no runner can instantiate: it
    # imports a function nobody provides. Restarting would fail the same way.
    module = cfg.root / "needs-import.wat"
    module.write_text(
        '(module (import "env" "missing" (func)) (memory (export "memory") 1)'
        ' (func (export "_start")))'
    )
    wasm_tenant(cfg, UNLINKED, module, restart=QUICK_RESTART + "max_restarts = 5, window = 60 }")
    d = await start_daemon()
    w = await d.wait_for(f"{UNLINKED}:w-0", lambda w: w["state"] == "fatal")
    assert w["exit_reason"].startswith("invalid-module: "), w
    assert "missing" in w["exit_reason"]
    assert w["restarts"] == 0


# -- the module file ----------------------------------------------------------------------


def check(cfg: ConfigDir) -> subprocess.CompletedProcess[str]:
    cfg.write()
    return subprocess.run(
        [str(BIN / "supervisord-qnx"), "--config", str(cfg.path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_module_file_is_a_config_error_naming_it(cfg: ConfigDir) -> None:
    tenant = cfg.tenant("lost", '[[worker]]\nname = "w"\nwasm = "../modules/gone.wasm"\n')
    res = check(cfg)
    assert res.returncode == 2, res.stdout + res.stderr
    module = cfg.root / "modules" / "gone.wasm"
    assert f"{tenant}: worker[0].wasm: {module}: no such module file" in res.stderr


@pytest.mark.parametrize(
    ("filename", "content", "says"),
    [
        ("garbage.wasm", b"this is not wasm at all", "magic header not detected"),
        ("truncated.wasm", b"\0asm\x01\0\0\0\x01\x05", "unexpected end"),
        ("broken.wat", b"(module (func (i32.add)))", "invalid module"),
    ],
)
def test_invalid_module_file_is_a_config_error_naming_it(
    cfg: ConfigDir, filename: str, content: bytes, says: str
) -> None:
    module = cfg.root / "tenants.d" / filename
    module.write_bytes(content)
    tenant = cfg.tenant("bad", f'[[worker]]\nname = "w"\nwasm = "{filename}"\n')
    res = check(cfg)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{tenant}: worker[0].wasm: {module}: invalid module: " in res.stderr
    assert says in res.stderr


def test_example_wasm_tenants_check_clean() -> None:
    res = subprocess.run(
        [
            str(BIN / "supervisord-qnx"),
            "--config",
            str(REPO / "config" / "supervisord.toml"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    for name in ("wasm-heartbeat", "wasm-grower", "wasm-spinner"):
        assert f"{name} (tenant)" in res.stdout


# -- the compiled-module cache --------------------------------------------------------------


async def test_corrupt_cache_entry_is_rebuilt_through_the_daemon(
    cfg: ConfigDir, start_daemon
) -> None:
    wasm_tenant(cfg, BEAT, WASM / "heartbeat.wat")
    d = await start_daemon()
    await d.wait_for(f"{BEAT}:w-0", lambda w: w["state"] == "running")
    assert (await started_event(d, BEAT, "w-0"))["cache"] == "miss"
    cache_dir = cfg.root / "state" / "wasm-cache"
    # One directory per worker uid (supervise/confine.py): workers run as nobody here.
    (entry,) = cache_dir.glob("uid-*/*.cwasm")
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped bit-pattern in the native code
    entry.write_bytes(bytes(blob))

    await d.call("restart", tenant=BEAT, wait=True)
    w = await d.wait_for(f"{BEAT}:w-0", lambda w: w["state"] == "running")
    assert (await started_event(d, BEAT, "w-0"))["cache"] == "rebuilt"
    await wait_for_line(cfg.worker_log(BEAT, "w-0"), "beat 3")
    assert (await d.worker(f"{BEAT}:w-0"))["pid"] == w["pid"]
    assert cache.unframe(entry.read_bytes()) is not None  # replaced by a good entry

    await d.call("restart", tenant=BEAT, wait=True)
    await d.wait_for(f"{BEAT}:w-0", lambda w: w["state"] == "running")
    assert (await started_event(d, BEAT, "w-0"))["cache"] == "hit"


# -- output and isolation -----------------------------------------------------------------


async def test_wasm_output_reaches_the_per_worker_log_like_a_command_worker(
    cfg: ConfigDir, start_daemon
) -> None:
    wasm_tenant(cfg, BEAT, WASM / "heartbeat.wat", worker="pulse")
    cfg.tenant(
        CMD,
        """
        [[worker]]
        name = "echo"
        command = ["/bin/sh", "-c", "echo command says hi; exec sleep 60"]
        """,
    )
    d = await start_daemon()
    await wait_for_line(cfg.worker_log(BEAT, "pulse-0"), "beat 3")
    await wait_for_line(cfg.worker_log(CMD, "echo-0"), "command says hi")
    (tail,) = await d.call("logs", tenant=BEAT, worker="pulse", lines=5)
    assert tail["file"] == str(cfg.worker_log(BEAT, "pulse-0"))
    assert any(line.startswith("beat ") for line in tail["lines"])


async def test_grower_does_not_disturb_a_heartbeat_in_another_partition(
    cfg: ConfigDir, start_daemon
) -> None:
    wasm_tenant(cfg, BEAT, WASM / "heartbeat.wat")
    # Starts with the heartbeat's tenant already beating, then grows to its cap and
    # keeps retrying; a large cap makes the grow phase do real work.
    cfg.tenant(
        GROWER,
        """
        autostart = false
        memory = { max = "512MiB" }
        [[worker]]
        name = "w"
        wasm = "%s"
        [worker.limits]
        memory = "256MiB"
        """
        % (WASM / "grower.wat"),
    )
    d = await start_daemon()
    log = cfg.worker_log(BEAT, "w-0")
    await wait_for_line(log, "beat 2")
    # Time each line's arrival in the log file: the runner writes it with one write(2)
    # straight to the file, so arrival time is beat time.
    arrivals: list[float] = []
    seen = len(log.read_bytes().splitlines())

    async def watch() -> None:
        nonlocal seen
        while True:
            lines = log.read_bytes().splitlines()
            arrivals.extend([time.monotonic()] * (len(lines) - seen))
            seen = len(lines)
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await d.call("start", tenant=GROWER, wait=True)
        await wait_for_line(cfg.worker_log(GROWER, "w-0"), "granted ")
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    beat = await d.worker(f"{BEAT}:w-0")
    assert len(arrivals) >= 15, (arrivals, beat)  # ~2.5 s at 10 beats/s
    assert max(gaps) < 0.5, f"largest gap between beats {max(gaps):.3f}s"
    assert (await d.worker(f"{GROWER}:w-0"))["state"] == "running"
    assert (await d.worker(f"{BEAT}:w-0"))["restarts"] == 0


def test_runner_overhead_constant_matches_a_measured_runner() -> None:
    """The default-cap overhead must cover a real runner's resident size (cold compile)."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisord_qnx.wasm.runner",
            "--module",
            str(WASM / "heartbeat.wat"),
            "--no-cache",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"beat")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert hwm * 1024 < WASM_RUNNER_OVERHEAD, f"runner peak {hwm} KiB"
