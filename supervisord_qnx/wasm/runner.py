"""The process a ``wasm`` worker runs as: one WASI command module under wasmtime.

    python -m supervisord_qnx.wasm.runner --module PATH [--arg A]... [--env K=V]...
        [--preopen GUEST=HOST]... [--memory BYTES] [--tables N] [--instances N]
        [--fuel N] [--timeout SECONDS] [--cache-dir DIR | --no-cache] [--report PATH]

The supervisor starts it inside the worker's OS partition with stdout/stderr
already pointing at the worker's log files; the guest's stdout/stderr are the
runner's fd 1/2 (wasmtime writes to them unbuffered, so nothing is held back at
exit). Outcomes are described in ``outcome.py`` (exit codes, report format).

Start-up cost matters because every restart pays it: this module imports only
the stdlib, ``wasmtime`` and its sibling modules ``cache`` and ``outcome``;
never pydantic/trio/structlog/msgpack or the rest of the package
(``tests/test_wasm_runner.py`` checks ``sys.modules`` at exit).

Limits, from inside the engine (the OS partition is the outer wall):

* ``--memory``: wasmtime's store limiter caps each linear memory at that many
  bytes and, with the cap set, allows one memory per store so the cap is a total.
  ``memory.grow`` past it returns -1 to the guest, which keeps running.
* ``--tables`` / ``--instances``: same limiter, table elements / instances.
* ``--fuel``: ``Config.consume_fuel``; running out is a ``deadline`` outcome.
* ``--timeout``: ``Config.epoch_interruption`` plus a timer thread that bumps
  the engine epoch once the time is up, which traps the guest at its next loop
  back-edge or function entry. A guest blocked *in the host* (a long
  ``poll_oneoff`` sleep) never reaches such a check, so after a grace period the
  timer thread ends the process itself with the same ``deadline`` outcome. The
  exit event's ``stopped_by`` says which mechanism ended the run (``epoch-trap``,
  ``fuel-trap`` or ``grace-exit``), so a deadline that never traps cannot hide
  behind the grace exit.

Memory denials: the wasmtime Python API (50.x) only exposes the fixed limits of
``wasmtime_store_limiter``; there is no callback when it refuses a grow, so the
runner cannot count refusals by itself. A guest that wants them counted calls
the optional import ``supervisord.memory_denied`` (no arguments) after a failed
``memory.grow``; the runner reads the guest's current memory size itself (so
``last_granted`` does not depend on the guest's honesty) and appends coalesced
``memory-denied`` events to the report. For guests that don't cooperate, the
exit event always carries ``memory_bytes``, the final size of the exported
memory, which the supervisor can compare with the cap.

Readiness and liveness (docs/wasm.md): a worker with ``ready = "notify"`` or a
``watchdog`` has ``NOTIFY_SOCKET`` in the runner's environment (never in the guest's).
The optional imports ``supervisord.ready``, ``supervisord.watchdog`` (no arguments)
and ``supervisord.status`` (a pointer and length of UTF-8 text in the exported
memory) send ``READY=1``, ``WATCHDOG=1`` and ``STATUS=...`` there from the runner's
own process, which is in the worker's partition, so the daemon accepts them. Each
returns 1 once sent, 0 when the worker has no socket, -1 when sending failed, like
``sd_notify``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the heavy imports, so load_ms includes them

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import wasmtime  # noqa: E402

from supervisord_qnx import sdnotify  # noqa: E402
from supervisord_qnx.wasm import cache, outcome  # noqa: E402
from supervisord_qnx.wasm.runner_args import RunnerArgs  # noqa: E402

#: Setting this env var to a path makes the runner write its ``sys.modules`` there at
#: exit (one name per line); the tests use it to keep the import set small.
DUMP_MODULES_ENV = "SUPERVISORD_QNX_WASM_DUMP_MODULES"

#: How long after an epoch deadline a guest stuck in a host call is given before the
#: runner exits on its own.
DEADLINE_GRACE_S = 1.0

#: Longest ``supervisord.status`` text sent (a datagram the daemon reads is 4 KiB at most).
MAX_STATUS_BYTES = 1024

#: Minimum spacing of ``memory-denied`` report lines: a guest retrying a failed grow
#: in a tight loop must not turn the report into a disk-filling log.
DENIAL_REPORT_INTERVAL_S = 1.0


class Report:
    """Append-only JSON-lines writer shared by the main and timer threads.

    Each event is one ``os.write`` on an ``O_APPEND`` descriptor, so lines from
    this process never interleave and a kill mid-way leaves at most one partial
    last line (which ``outcome.read_report`` skips).
    """

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._final_written = False
        self._fd: int | None = None
        if path:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(path, flags, 0o644)

    def write(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._write_locked(event)

    def _write_locked(self, event: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(self._fd, line)
        except OSError:
            pass  # a full disk must not turn a healthy guest into a runner failure

    def write_final(self, event: dict[str, Any]) -> bool:
        """Write the single ``exit`` event; False if another thread already did."""
        with self._lock:
            if self._final_written:
                return False
            self._final_written = True
            self._write_locked(event)
            return True


class Denials:
    """Counts guest-reported memory denials and writes them coalesced."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._lock = threading.Lock()
        self.count = 0
        self.last_granted = 0
        self._written = 0
        self._last_write = float("-inf")
        self._timer: threading.Timer | None = None

    def record(self, granted: int) -> None:
        with self._lock:
            self.count += 1
            self.last_granted = granted
            wait = self._last_write + DENIAL_REPORT_INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._flush_locked()
            elif self._timer is None:
                # A quiet guest still gets its last denials reported within the interval.
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._timer = None
        if self.count == self._written:
            return
        self._report.write(
            {"event": "memory-denied", "count": self.count, "last_granted": self.last_granted}
        )
        self._written = self.count
        self._last_write = time.monotonic()


def summarise_error(message: str) -> str:
    """One line from wasmtime's multi-line error chain ("Caused by: 0: ... 1: ...").

    Errors raised while wasm runs start with a backtrace ("error while executing
    at wasm backtrace:" and frame lines), which says where, not what: keep only
    the cause chain then.
    """
    head, sep, cause = message.partition("Caused by:")
    if sep and "wasm backtrace" in head:
        message = cause
    parts = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line == "Caused by:":
            continue
        head, sep, rest = line.partition(": ")
        if sep and head.isdigit():
            line = rest
        parts.append(line)
    return ": ".join(parts) or "unknown error"


def trap_summary(trap: wasmtime.Trap) -> str:
    """The human part of a trap: wasmtime's text starts with a backtrace header, so the
    line that says what happened is the ``wasm trap: ...`` one near the end."""
    message = trap.message
    for line in reversed(message.splitlines()):
        _, sep, rest = line.partition("wasm trap: ")
        if sep:
            return rest.strip()
    if trap.trap_code is not None:
        return trap.trap_code.name.lower().replace("_", " ")
    return summarise_error(message)


class Runner:
    def __init__(self, opts: RunnerArgs) -> None:
        self.opts = opts
        self.report = Report(opts.report)
        self.denials = Denials(self.report)
        self.done = threading.Event()
        self.store: wasmtime.Store | None = None
        self.memory: wasmtime.Memory | None = None

    # -- ending ---------------------------------------------------------------

    def finish(
        self,
        reason: str,
        code: int,
        stderr_text: str | None = None,
        stopped_by: str | None = None,
    ) -> NoReturn:
        """Write the outcome and leave at once, from whichever thread gets here first.

        ``os._exit`` rather than ``sys.exit``: the timer thread must be able to end
        the process while the main thread is inside wasm, and skipping interpreter
        teardown also skips running wasmtime destructors against a store another
        thread may still be executing in. Guest output is already on fd 1/2.
        """
        self.done.set()
        self.denials.flush()
        event: dict[str, Any] = {"event": "exit", "reason": reason, "code": code}
        if stopped_by is not None:
            event["stopped_by"] = stopped_by
        memory_bytes = self._memory_bytes()
        if memory_bytes is not None:
            event["memory_bytes"] = memory_bytes
        if self.report.write_final(event) and stderr_text:
            try:
                sys.stderr.write(stderr_text.rstrip("\n") + "\n")
            except (OSError, ValueError):
                pass
        dump = os.environ.get(DUMP_MODULES_ENV)
        if dump:
            with open(dump, "w") as f:
                f.write("\n".join(sorted(sys.modules)) + "\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    def _memory_bytes(self) -> int | None:
        # Only safe from the main thread once the guest has stopped running.
        if (
            self.memory is None
            or self.store is None
            or threading.current_thread() is not (threading.main_thread())
        ):
            return None
        try:
            return self.memory.data_len(self.store)
        except Exception:  # noqa: BLE001 - a figure for the report, never worth a failure
            return None

    def invalid(self, message: str) -> NoReturn:
        reason = outcome.REASON_INVALID_PREFIX + message
        self.finish(reason, outcome.EXIT_INVALID_MODULE, f"wasm runner: {reason}")

    # -- running --------------------------------------------------------------

    def engine_config(self) -> tuple[wasmtime.Config, str]:
        """The engine config, and the string of its codegen-relevant flags (cache key)."""
        config = wasmtime.Config()
        fuel = self.opts.fuel is not None
        epoch = self.opts.timeout is not None
        # Both flags change the generated code (fuel counters, epoch checks), so they
        # are only switched on when asked for, and they are part of the cache key.
        config.consume_fuel = fuel
        config.epoch_interruption = epoch
        return config, f"fuel={int(fuel)},epoch={int(epoch)}"

    def wasi_config(self) -> wasmtime.WasiConfig:
        wasi = wasmtime.WasiConfig()
        wasi.argv = [os.path.basename(self.opts.module), *self.opts.arg]
        # Only the configured environment: the runner's own env is the supervisor's.
        wasi.env = list(self.opts.env)
        wasi.inherit_stdout()
        wasi.inherit_stderr()
        for guest, host in self.opts.preopen:
            if not os.path.isdir(host):
                raise RunnerError(f"preopen {guest}={host}: not a directory")
            wasi.preopen_dir(host, guest)
        return wasi

    def on_memory_denied(self, caller: wasmtime.Caller) -> None:
        memory = caller.get("memory")
        granted = memory.data_len(caller) if isinstance(memory, wasmtime.Memory) else 0
        self.denials.record(granted)

    def notify(self, message: str) -> int:
        """sd_notify's answer: 1 sent, 0 no NOTIFY_SOCKET, -1 the send failed."""
        try:
            return 1 if sdnotify.notify(message) else 0
        except (OSError, ValueError):
            return -1

    def on_status(self, caller: wasmtime.Caller, ptr: int, length: int) -> int:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory) or ptr < 0 or length < 0:
            return -1
        size = memory.data_len(caller)
        end = min(ptr + min(length, MAX_STATUS_BYTES), size)
        if ptr > size:
            return -1
        text = bytes(memory.read(caller, ptr, end)).decode("utf-8", "replace")
        return self.notify(sdnotify.status(text))

    def link_supervisord(self, linker: wasmtime.Linker) -> None:
        """The ``supervisord`` import module (all optional for a guest)."""
        linker.define_func(
            "supervisord",
            "memory_denied",
            wasmtime.FuncType([], []),
            self.on_memory_denied,
            access_caller=True,
        )
        i32 = wasmtime.ValType.i32()
        linker.define_func(
            "supervisord", "ready", wasmtime.FuncType([], [i32]), lambda: self.notify("READY=1")
        )
        linker.define_func(
            "supervisord",
            "watchdog",
            wasmtime.FuncType([], [i32]),
            lambda: self.notify("WATCHDOG=1"),
        )
        linker.define_func(
            "supervisord",
            "status",
            wasmtime.FuncType([i32, i32], [i32]),
            self.on_status,
            access_caller=True,
        )

    def load(self, engine: wasmtime.Engine, flags: str) -> tuple[wasmtime.Module, str]:
        """The compiled module (from the cache when it can) and the cache's word on it."""
        opts = self.opts
        try:
            with open(opts.module, "rb") as f:
                source = f.read()
        except OSError as e:
            self.invalid(f"{opts.module}: {e.strerror or e}")
        cache_dir = None
        if not opts.no_cache:
            cache_dir = cache.open_cache_dir(opts.cache_dir or cache.default_cache_dir())
        try:
            return cache.load_module(engine, source, flags, cache_dir)
        except wasmtime.WasmtimeError as e:
            self.invalid(f"{opts.module}: {summarise_error(str(e))}")

    def new_store(self, engine: wasmtime.Engine) -> wasmtime.Store:
        """A store with the engine-enforced limits, fuel and deadline of this run."""
        opts = self.opts
        store = wasmtime.Store(engine)
        self.store = store
        store.set_limits(
            memory_size=opts.memory if opts.memory is not None else -1,
            table_elements=opts.tables if opts.tables is not None else -1,
            instances=opts.instances if opts.instances is not None else -1,
            # With a cap, one memory per store, so the cap bounds the total.
            memories=1 if opts.memory is not None else -1,
        )
        if opts.fuel is not None:
            store.set_fuel(opts.fuel)
        if opts.timeout is not None:
            store.set_epoch_deadline(1)
        store.set_wasi(self.wasi_config())
        return store

    def run(self) -> NoReturn:
        opts = self.opts
        config, flags = self.engine_config()
        engine = wasmtime.Engine(config)
        module, cache_state = self.load(engine, flags)
        store = self.new_store(engine)

        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        self.link_supervisord(linker)
        if opts.timeout is not None:
            # Started before instantiation: a start function can spin too.
            threading.Thread(
                target=self._deadline, args=(engine, opts.timeout), daemon=True
            ).start()
        try:
            instance = linker.instantiate(store, module)
        except wasmtime.Trap as trap:
            self._trapped(trap)
        except wasmtime.WasmtimeError as e:
            # Unknown imports, limits the module cannot start under (memory minimum
            # above --memory): the module cannot run here as configured.
            self.invalid(summarise_error(str(e)))
        exports = instance.exports(store)
        memory = exports.get("memory")
        if isinstance(memory, wasmtime.Memory):
            self.memory = memory
        start = exports.get("_start")
        if not isinstance(start, wasmtime.Func):
            self.invalid(f"{opts.module}: no exported _start function (not a WASI command)")
        load_ms = round((time.perf_counter() - _T0) * 1000, 2)
        self.report.write(
            {"event": "started", "pid": os.getpid(), "cache": cache_state, "load_ms": load_ms}
        )
        try:
            start(store)
        except wasmtime.ExitTrap as e:
            code = e.code
            status = (
                code if 0 <= code <= outcome.MAX_GUEST_EXIT else outcome.EXIT_GUEST_OUT_OF_RANGE
            )
            self.finish(f"{outcome.REASON_EXIT_PREFIX}{code}", status)
        except wasmtime.Trap as trap:
            self._trapped(trap)
        except wasmtime.WasmtimeError as e:
            # A host call failing hard (not a proc_exit): report it like a trap.
            text = summarise_error(str(e))
            self.finish(outcome.REASON_TRAP_PREFIX + text, outcome.EXIT_TRAP, f"wasm trap: {e}")
        self.finish(f"{outcome.REASON_EXIT_PREFIX}0", 0)

    def _trapped(self, trap: wasmtime.Trap) -> NoReturn:
        if trap.trap_code in (wasmtime.TrapCode.INTERRUPT, wasmtime.TrapCode.OUT_OF_FUEL):
            fuel = trap.trap_code is wasmtime.TrapCode.OUT_OF_FUEL
            self.finish(
                outcome.REASON_DEADLINE,
                outcome.EXIT_DEADLINE,
                f"wasm runner: deadline ({'fuel exhausted' if fuel else 'timeout'})\n"
                f"{trap.message}",
                stopped_by=outcome.STOPPED_BY_FUEL if fuel else outcome.STOPPED_BY_EPOCH,
            )
        self.finish(
            outcome.REASON_TRAP_PREFIX + trap_summary(trap),
            outcome.EXIT_TRAP,
            f"wasm trap: {trap.message}",
        )

    def _deadline(self, engine: wasmtime.Engine, timeout: float) -> None:
        if self.done.wait(timeout):
            return
        engine.increment_epoch()  # the guest traps at its next epoch check
        if self.done.wait(DEADLINE_GRACE_S):
            return
        self.finish(
            outcome.REASON_DEADLINE,
            outcome.EXIT_DEADLINE,
            "wasm runner: deadline (timeout; guest blocked in a host call)",
            stopped_by=outcome.STOPPED_BY_GRACE,
        )


class RunnerError(Exception):
    """The environment, not the module, is unusable (e.g. a missing preopen dir)."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    opts = RunnerArgs.parse(sys.argv[1:] if argv is None else argv)
    try:
        runner = Runner(opts)
    except OSError as e:
        print(f"wasm runner: cannot open report {opts.report}: {e}", file=sys.stderr)
        sys.exit(outcome.EXIT_RUNNER_ERROR)
    try:
        runner.run()
    except RunnerError as e:
        runner.finish(
            outcome.REASON_RUNNER_PREFIX + str(e), outcome.EXIT_RUNNER_ERROR, f"wasm runner: {e}"
        )
    except Exception as e:  # noqa: BLE001 - a runner bug: still leave an outcome behind
        import traceback

        runner.finish(
            outcome.REASON_RUNNER_PREFIX + f"{type(e).__name__}: {e}",
            outcome.EXIT_RUNNER_ERROR,
            traceback.format_exc(),
        )


if __name__ == "__main__":
    main()
