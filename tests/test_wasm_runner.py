"""The wasm runner end to end: real wasmtime, real runner processes, no mocks.

Timing bounds are deliberately loose: the machine has 2 cores shared with other
test runs.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisord_qnx.wasm import cache, outcome

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "wasm"
MIB = 1 << 20


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def runner_cmd(module: Path | str, *extra: str, cache_dir: Path, report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "supervisord_qnx.wasm.runner",
        "--module",
        str(module),
        "--cache-dir",
        str(cache_dir),
        "--report",
        str(report),
        *extra,
    ]


def run(
    module: Path | str, *extra: str, cache_dir: Path, report: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        runner_cmd(module, *extra, cache_dir=cache_dir, report=report),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write_wat(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


WASI_EXIT_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "partial line, no newline")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 24))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 3))))
"""

# Sleeps 30 s in one poll_oneoff: the guest never returns to wasm code, so only
# the runner's grace-period exit can enforce a deadline.
BLOCKED_WAT = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $p (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 30000000000))
    (drop (call $p (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 100)))))
"""


def test_heartbeat_beats_at_about_100ms_and_exits_0(tmp_path: Path, cache_dir: Path) -> None:
    report = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        runner_cmd(EXAMPLES / "heartbeat.wat", "--arg", "8", cache_dir=cache_dir, report=report),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines, stamps = [], []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        stamps.append(time.monotonic())
    assert proc.wait(timeout=30) == 0
    assert lines == [f"beat {i}" for i in range(1, 9)]
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    median = gaps[len(gaps) // 2]
    assert 0.07 <= median <= 0.5, gaps
    summary = outcome.read_report(report)
    assert summary["exit"] == {
        "event": "exit",
        "reason": "exit:0",
        "code": 0,
        "memory_bytes": 65536,
    }
    assert summary["started"]["pid"] == proc.pid


def test_grower_is_capped_not_killed_and_denials_are_reported(
    tmp_path: Path, cache_dir: Path
) -> None:
    report = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        runner_cmd(
            EXAMPLES / "grower.wat", "--memory", str(16 * MIB), cache_dir=cache_dir, report=report
        ),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        granted_line = proc.stdout.readline()
        alive = [proc.stdout.readline() for _ in range(12)]  # ~1.2 s of survival
        assert proc.poll() is None, "a capped grower must keep running"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    word, granted = granted_line.split()
    assert word == "granted"
    assert int(granted) == 16 * MIB  # every page up to the cap, and not one more
    assert [a.split()[0] for a in alive] == ["alive"] * 12
    summary = outcome.read_report(report)
    assert summary["exit"] is None  # killed by our SIGTERM, so no exit event
    denied = summary["memory_denied"]
    assert denied is not None
    assert denied["last_granted"] == 16 * MIB
    # One at the cap, then one per retry every 100 ms; coalesced to <= 1 line/s,
    # so the latest line may lag behind the true count.
    assert denied["count"] >= 2
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert sum(1 for e in lines if e["event"] == "memory-denied") <= 4


def test_memory_minimum_above_cap_is_invalid_module(tmp_path: Path, cache_dir: Path) -> None:
    module = write_wat(tmp_path, "big.wat", '(module (memory 300) (func (export "_start")))')
    report = tmp_path / "r.jsonl"
    res = run(module, "--memory", "16MiB", cache_dir=cache_dir, report=report)
    assert res.returncode == outcome.EXIT_INVALID_MODULE
    reason = outcome.read_report(report)["exit"]["reason"]
    assert reason.startswith("invalid-module: ") and "memory" in reason


def test_oob_store_traps(tmp_path: Path, cache_dir: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = run(EXAMPLES / "oob.wat", cache_dir=cache_dir, report=report)
    assert res.returncode == outcome.EXIT_TRAP
    assert res.stdout == "about to write out of bounds\n"
    exit_event = outcome.read_report(report)["exit"]
    assert exit_event["reason"] == "trap: out of bounds memory access"
    assert exit_event["code"] == outcome.EXIT_TRAP
    assert "out of bounds memory access" in res.stderr


@pytest.mark.parametrize(
    ("limit", "stopped_by", "says"),
    [
        (["--timeout", "0.5"], outcome.STOPPED_BY_EPOCH, "wasm runner: deadline (timeout)\n"),
        (
            ["--fuel", "5000000"],
            outcome.STOPPED_BY_FUEL,
            "wasm runner: deadline (fuel exhausted)\n",
        ),
    ],
)
def test_spinner_is_trapped_by_the_engine(
    tmp_path: Path, cache_dir: Path, limit: list[str], stopped_by: str, says: str
) -> None:
    # The spinner never calls the host, so the engine's own check must trap it: the
    # runner's grace exit (which would also say "deadline") must not be what ended it.
    report = tmp_path / "r.jsonl"
    t0 = time.monotonic()
    res = run(EXAMPLES / "spinner.wat", *limit, cache_dir=cache_dir, report=report, timeout=30)
    elapsed = time.monotonic() - t0
    assert res.returncode == outcome.EXIT_DEADLINE
    exit_event = outcome.read_report(report)["exit"]
    assert (exit_event["reason"], exit_event["stopped_by"]) == ("deadline", stopped_by)
    assert res.stderr.startswith(says), res.stderr
    assert "blocked in a host call" not in res.stderr
    if limit[0] == "--timeout":
        assert 0.4 <= elapsed < 15


def test_deadline_holds_while_guest_is_blocked_in_a_host_call(
    tmp_path: Path, cache_dir: Path
) -> None:
    report = tmp_path / "r.jsonl"
    module = write_wat(tmp_path, "blocked.wat", BLOCKED_WAT)
    t0 = time.monotonic()
    res = run(module, "--timeout", "0.3", cache_dir=cache_dir, report=report, timeout=30)
    assert res.returncode == outcome.EXIT_DEADLINE
    assert time.monotonic() - t0 < 15  # not the 30 s the guest asked for
    exit_event = outcome.read_report(report)["exit"]
    # No epoch check runs inside the host call: the runner's own timer ended it.
    assert (exit_event["reason"], exit_event["stopped_by"]) == (
        "deadline",
        outcome.STOPPED_BY_GRACE,
    )
    assert res.stderr == "wasm runner: deadline (timeout; guest blocked in a host call)\n"


def test_proc_exit_code_and_unterminated_output_reach_the_log_file(
    tmp_path: Path, cache_dir: Path
) -> None:
    module = write_wat(tmp_path, "exit3.wat", WASI_EXIT_WAT)
    report = tmp_path / "r.jsonl"
    log = tmp_path / "stdout.log"
    # The supervisor hands the runner a log file as fd 1, opened for append.
    with open(log, "ab") as out:
        out.write(b"earlier\n")
        out.flush()
        rc = subprocess.run(
            runner_cmd(module, cache_dir=cache_dir, report=report),
            stdout=out,
            cwd=ROOT,
            timeout=30,
        ).returncode
    assert rc == 3
    assert log.read_bytes() == b"earlier\npartial line, no newline"
    assert outcome.read_report(report)["exit"]["reason"] == "exit:3"


def test_out_of_range_proc_exit_is_a_one_line_trap(tmp_path: Path, cache_dir: Path) -> None:
    # wasmtime itself refuses proc_exit codes outside 0..125 with an error, not an exit.
    module = write_wat(tmp_path, "e200.wat", WASI_EXIT_WAT.replace("i32.const 3", "i32.const 200"))
    report = tmp_path / "r.jsonl"
    res = run(module, cache_dir=cache_dir, report=report)
    assert res.returncode == outcome.EXIT_TRAP
    reason = outcome.read_report(report)["exit"]["reason"]
    assert reason == "trap: exit with invalid exit status outside of [0..126)"


def test_cache_miss_hit_and_rebuild_after_corruption(tmp_path: Path, cache_dir: Path) -> None:
    report = tmp_path / "r.jsonl"
    hb = EXAMPLES / "heartbeat.wat"

    def start(expected_cache: str) -> None:
        res = run(hb, "--arg", "2", cache_dir=cache_dir, report=report)
        assert res.returncode == 0, res.stderr
        assert res.stdout == "beat 1\nbeat 2\n"
        summary = outcome.read_report(report)
        assert summary["started"]["cache"] == expected_cache
        assert summary["exit"]["reason"] == "exit:0"

    start("miss")
    start("hit")
    (entry,) = cache_dir.glob("*.cwasm")
    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the machine code
    entry.write_bytes(bytes(blob))
    start("rebuilt")
    start("hit")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    start("rebuilt")
    entry.write_bytes(b"")  # empty
    start("rebuilt")
    start("hit")
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temp files left


def test_engine_flags_get_their_own_cache_entries(tmp_path: Path, cache_dir: Path) -> None:
    report = tmp_path / "r.jsonl"
    hb = EXAMPLES / "heartbeat.wat"
    for extra, expected in [([], "miss"), (["--fuel", "10000000"], "miss"), ([], "hit")]:
        res = run(hb, "--arg", "1", *extra, cache_dir=cache_dir, report=report)
        assert res.returncode == 0, res.stderr
        assert outcome.read_report(report)["started"]["cache"] == expected
    assert len(list(cache_dir.glob("*.cwasm"))) == 2


def test_group_writable_cache_dir_is_not_trusted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    report = tmp_path / "r.jsonl"
    res = run(EXAMPLES / "heartbeat.wat", "--arg", "1", cache_dir=shared, report=report)
    assert res.returncode == 0
    assert outcome.read_report(report)["started"]["cache"] == "off"
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("garbage.wasm", b"\0asm\x01\0\0\0garbage", "failed to parse"),
        ("bad.wat", b"(module (func (i32.add)))", "type mismatch"),
        ("import.wat", b'(module (import "nope" "f" (func)) (func (export "_start")))', "nope"),
        ("nostart.wat", b"(module)", "_start"),
    ],
)
def test_invalid_module(
    tmp_path: Path, cache_dir: Path, name: str, content: bytes, needle: str
) -> None:
    module = tmp_path / name
    module.write_bytes(content)
    report = tmp_path / "r.jsonl"
    res = run(module, cache_dir=cache_dir, report=report)
    assert res.returncode == outcome.EXIT_INVALID_MODULE
    reason = outcome.read_report(report)["exit"]["reason"]
    assert reason.startswith("invalid-module: ")
    assert needle in reason
    assert reason in res.stderr  # the log says the same, on one line
    assert "\n" not in reason


def test_missing_module(tmp_path: Path, cache_dir: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = run(tmp_path / "absent.wasm", cache_dir=cache_dir, report=report)
    assert res.returncode == outcome.EXIT_INVALID_MODULE
    reason = outcome.read_report(report)["exit"]["reason"]
    assert reason.startswith("invalid-module: ") and "No such file" in reason


def test_args_env_and_preopen_reach_the_guest(tmp_path: Path, cache_dir: Path) -> None:
    # Reads /data/in.txt through the preopen and echoes it; exits with argc+envc*10.
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("hello from the host\n")
    module = write_wat(
        tmp_path,
        "cat.wat",
        """
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $envs (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "in.txt")
  (func (export "_start")
    ;; fd 3 is the first preopen
    (if (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 6) (i32.const 0)
                    (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 200))
      (then (call $exit (i32.const 99))))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 512))
    (drop (call $read (i32.load (i32.const 200)) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (drop (call $args (i32.const 300) (i32.const 304)))
    (drop (call $envs (i32.const 308) (i32.const 312)))
    (call $exit (i32.add (i32.load (i32.const 300))
                         (i32.mul (i32.load (i32.const 308)) (i32.const 10))))))
""",
    )
    report = tmp_path / "r.jsonl"
    res = run(
        module,
        *("--arg", "a", "--arg", "b", "--env", "X=1", "--env", "Y=2"),
        *("--preopen", f"/data={data}"),
        cache_dir=cache_dir,
        report=report,
    )
    assert res.stdout == "hello from the host\n", res.stderr
    assert res.returncode == 3 + 2 * 10  # argv = [module, a, b]; only the 2 given env vars


def test_runner_imports_stay_light(tmp_path: Path, cache_dir: Path) -> None:
    dump = tmp_path / "modules.txt"
    report = tmp_path / "r.jsonl"
    res = subprocess.run(
        runner_cmd(EXAMPLES / "heartbeat.wat", "--arg", "1", cache_dir=cache_dir, report=report),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={**os.environ, "SUPERVISORD_QNX_WASM_DUMP_MODULES": str(dump)},
    )
    assert res.returncode == 0, res.stderr
    modules = set(dump.read_text().split())
    assert "wasmtime" in modules  # the dump is real
    for heavy in ("pydantic", "trio", "structlog", "msgpack", "hypothesis", "pytest"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in modules), heavy
    ours = {m for m in modules if m.startswith("supervisord_qnx")}
    # (run with -m, the runner itself is __main__, not supervisord_qnx.wasm.runner)
    assert ours == {
        "supervisord_qnx",
        "supervisord_qnx.sdnotify",  # stdlib only: the ready/watchdog/status imports
        "supervisord_qnx.wasm",
        "supervisord_qnx.wasm.cache",
        "supervisord_qnx.wasm.outcome",
        "supervisord_qnx.wasm.runner_args",
    }


def test_outcome_module_imports_no_wasmtime() -> None:
    code = "import sys, supervisord_qnx.wasm.outcome; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert "supervisord_qnx.wasm.outcome" in out
    assert not {"wasmtime", "pydantic", "trio", "structlog"} & set(out)


# -- pure parts -------------------------------------------------------------------

EVENTS = [
    {"event": "started", "pid": 1, "cache": "miss", "load_ms": 1.0},
    {"event": "exit", "reason": "exit:0", "code": 0},
    {"event": "started", "pid": 2, "cache": "hit", "load_ms": 1.0},
    {"event": "memory-denied", "count": 3, "last_granted": 65536},
    {"event": "memory-denied", "count": 9, "last_granted": 131072},
    {"event": "exit", "reason": "trap: unreachable", "code": outcome.EXIT_TRAP},
]
REPORT_BYTES = b"".join(json.dumps(e).encode() + b"\n" for e in EVENTS)


def test_read_report_describes_the_latest_run(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(REPORT_BYTES)
    summary = outcome.read_report(path)
    assert summary["started"]["pid"] == 2
    assert summary["memory_denied"] == {"count": 9, "last_granted": 131072}
    assert summary["exit"]["reason"] == "trap: unreachable"
    assert outcome.read_report(tmp_path / "none") == {
        "started": None,
        "exit": None,
        "memory_denied": None,
    }


@given(cut=st.integers(min_value=0, max_value=len(REPORT_BYTES)))
def test_read_report_tolerates_truncation_anywhere(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    path = tmp_path_factory.mktemp("rep") / "r.jsonl"
    path.write_bytes(REPORT_BYTES[:cut])
    summary = outcome.read_report(path)
    if cut == len(REPORT_BYTES):
        assert summary["exit"] is not None
    elif cut < len(REPORT_BYTES) - 1:
        # The final exit line is cut: no exit is reported rather than a wrong one.
        assert summary["exit"] is None or summary["started"]["pid"] == 1


@given(payload=st.binary(min_size=1, max_size=256), data=st.data())
def test_cache_frame_detects_any_single_byte_change(payload: bytes, data: st.DataObject) -> None:
    blob = bytearray(cache.frame(payload))
    assert cache.unframe(bytes(blob)) == payload
    i = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    blob[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    assert cache.unframe(bytes(blob)) is None
    assert cache.unframe(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])) is None
