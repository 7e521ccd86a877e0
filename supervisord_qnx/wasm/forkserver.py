"""Pre-initialised wasm starts: a fork server that has already imported wasmtime and
the runner, so a wasm worker costs a ``fork`` instead of an interpreter start.

    python -m supervisord_qnx.wasm.forkserver --fd N

Why a separate process: the daemon runs trio with worker threads, and forking a
threaded process is unsafe. The server is single-threaded (``import wasmtime``
starts no thread, and no engine is built before a fork: an engine may own
threads and locks that a child would inherit half-taken), so forking it is the
ordinary, safe ``fork`` of a plain Python process.

Protocol, over a ``SOCK_SEQPACKET`` socketpair (one message = one datagram, so no
framing): the server first sends ``{"ready": true}``; then, per request, the daemon
sends JSON ``{"argv": [runner options], "env": {...}, "cwd": str, "plan":
{"procs": [...], "rlimits": [[resource, value], ...], "env": {...}, "process":
{...}}}`` (``process``: ``partition/process.py``'s settings) with the
worker's log fd attached (``SCM_RIGHTS``), and the server answers ``{"pid": N}``
or ``{"error": "..."}``. One request at a time (the client holds a lock).

Per request, the server forks an intermediate A, which forks the worker W and
exits at once; the server reaps A. The daemon is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so when A exits W is re-parented to the *daemon*,
which then waits for it through its ``ChildReaper`` like any worker. The server
answers only after A has been reaped, so the pid it returns is already the
daemon's child; the daemon holds ``ChildReaper.spawning()`` for the whole request,
so the orphan sweep cannot take W's status even if W ends at once.

W, still running only this module's code, applies the attach plan *first*: it
writes its own pid into each partition ``cgroup.procs`` file, sets the
backend's rlimits, and writes the portable backend's leaf tag where the
accounting reads it (``_retag``: ``/proc/self/environ``). Only then does it
``setsid()`` (its own session, so a stop signal to its group reaches it and
nothing else), put ``/dev/null`` and the log on fd 0/1/2,
``chdir``, replace its environment, report its pid to the server over a pipe,
close every other descriptor, and call the runner's ``main`` with the options
the daemon built: the module is opened only after all of that. If a step fails,
W reports the error instead of its pid and exits without running tenant code.

This module is imported by the daemon for the client side; it imports only the
stdlib and ``partition.accounting`` at module level (the runner and wasmtime are
imported by ``serve``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from supervisord_qnx.partition.accounting import OWNER, TAG, read_tag
from supervisord_qnx.seqpacket import SeqpacketClient

#: Placeholder value of the leaf tag in the server's own start-up environment; see
#: ``_retag``. Long enough for any ``<partition path>:<leaf>``.
TAG_SLOT = "." * 1024

#: Test hook: when a worker's environment sets this to a path, W writes its own
#: ``/proc/self/cgroup`` and environment tag there right before calling the runner's
#: ``main``, i.e. after the attach plan was applied and before any tenant code.
PROBE_ENV = "SUPERVISORD_QNX_FORKSERVER_PROBE"

MAX_MESSAGE = 1 << 20
READY_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0
WORKER_REPORT_TIMEOUT_S = 10.0


class ForkServerGone(Exception):
    """The server is not running or broke its connection; the caller may retry later."""


class ForkServerRefused(OSError):
    """The server answered with an error for this start (e.g. an attach step failed)."""


# -- the daemon's side ------------------------------------------------------------------


def server_env(owner: str | None = None) -> dict[str, str]:
    """The server's start-up environment, which every worker it forks shows in
    ``/proc/PID/environ`` (the block a process was exec'd with): never the daemon's own
    (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``INVOCATION_ID``, secrets). A minimal PATH,
    the locale, ``PYTHONPATH`` where the daemon's own import path needs it, and the leaf
    tag's slot."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env[TAG] = TAG_SLOT
    if owner is not None:
        # Beside the tag in every forked worker: the portable accounting counts a tag only
        # with its own daemon's owner value (partition/accounting.py).
        env[OWNER] = owner
    return env


class ForkServerClient(SeqpacketClient):
    """One fork server process, owned by the daemon. Blocking methods: call from a thread.

    ``start`` runs the server as a child of the daemon through ``spawn_child``
    (the supervisor passes a function that spawns inside ``ChildReaper.spawning()``
    and registers the pid), so the daemon's reaper, not ``subprocess``, collects it.
    """

    what = "fork server"
    gone = ForkServerGone

    def __init__(self, log_path: Path, python: str = sys.executable) -> None:
        super().__init__()
        self.owner: str | None = None  # SUPERVISORD_QNX_OWNER for server_env
        self.log_path = log_path
        self.python = python
        # cgroup.procs files the server joins before its interpreter starts (its own
        # partition, supervise/prefork.py), through the same exec shim as workers.
        self.attach_procs: tuple[str, ...] = ()

    def start(self, spawn_child: Callable[[Callable[[], int]], int]) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                argv = [self.python, "-m", __name__, "--fd", str(theirs.fileno())]
                if self.attach_procs:
                    from supervisord_qnx.partition.cgroupfs import SHIM

                    procs = self.attach_procs
                    argv = ["/bin/sh", "-c", SHIM, "sh", str(len(procs)), *procs, *argv]

                def popen() -> int:
                    proc = subprocess.Popen(
                        argv,
                        env=server_env(self.owner),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        pass_fds=(theirs.fileno(),),
                        close_fds=True,
                        start_new_session=True,
                    )
                    # The daemon's reaper owns the status; keep subprocess from taking it.
                    proc.returncode = 0
                    return proc.pid

                pid = spawn_child(popen)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = pid
        if not json.loads(self._handshake(ours, READY_TIMEOUT_S, MAX_MESSAGE)).get("ready"):
            ours.close()
            raise ForkServerGone("fork server did not say it was ready")
        self._connected(ours, REPLY_TIMEOUT_S)
        return pid

    def spawn(
        self,
        runner_argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        log_fd: int,
        plan: Mapping[str, Any],
    ) -> int:
        """Start one worker; its pid. Raises ``ForkServerGone`` or ``ForkServerRefused``."""
        request = json.dumps(
            {"argv": list(runner_argv), "env": dict(env), "cwd": cwd, "plan": dict(plan)}
        ).encode()
        answer = json.loads(self._exchange(request, [log_fd], MAX_MESSAGE))
        if "pid" in answer:
            return int(answer["pid"])
        raise ForkServerRefused(str(answer.get("error", "fork server error")))


# -- the server's side ------------------------------------------------------------------


def serve(fd: int) -> None:
    # The expensive part every plain runner pays at start, paid once here. Nothing
    # else: no engine (threads, locks), no module compiled (it is the worker's).
    import ctypes  # noqa: F401 - imported before forking, used by the workers
    import resource  # noqa: F401

    # Everything a worker imports after it dropped to its tenant's user, who may not
    # be able to read the interpreter's own library directory (a Python installed
    # under a private home): the privilege drop, and the cache's temporary files.
    import tempfile  # noqa: F401

    from supervisord_qnx.partition import process  # noqa: F401
    from supervisord_qnx.wasm import runner  # noqa: F401 - imports wasmtime
    from supervisord_qnx.wasm.runner_args import RunnerArgs

    # Also pre-paid: argparse's first use (regex compiles, gettext look-ups) is a few
    # ms in every child otherwise. Pure Python state, no threads.
    RunnerArgs.parse(["--module", "warm-up.wasm", "--env", "K=V"])
    # The seccomp profile's BPF, compiled here once rather than in every child that
    # loads it (libseccomp work, and the binding's import).
    from supervisord_qnx.partition import seccomp

    if seccomp.unavailable() is None:
        seccomp.program("default")
    # Objects that exist now live as long as the server: keep the collector from
    # touching them in every child, which would copy their pages (docs of gc.freeze).
    gc.freeze()
    sock = socket.socket(fileno=fd)
    print(f"wasm fork server {os.getpid()} ready", flush=True)
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
        except ConnectionError:
            return
        if not msg:
            return  # the daemon closed its end: it is shutting down or gone
        try:
            try:
                if len(fds) != 1:
                    raise ValueError(f"expected one log fd, got {len(fds)}")
                answer: dict[str, Any] = {"pid": _fork_worker(json.loads(msg), fds[0])}
            except Exception as exc:  # noqa: BLE001 - one bad start is answered, not fatal
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            sock.send(json.dumps(answer).encode())
        finally:
            for f in fds:
                os.close(f)


def _fork_worker(request: dict[str, Any], log_fd: int) -> int:
    r, w = os.pipe()
    try:
        # Nothing of the server's buffered output may be written twice by a child.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        a = os.fork()
        if a == 0:  # the intermediate: fork W and leave, so W is re-parented to the daemon
            # No setsid here: W calls it itself, so that W's own pid is its session and
            # group id, as for a Popen'd worker (stop signals the group by that pid).
            try:
                os.close(r)
                if os.fork() == 0:
                    _worker(request, log_fd, w)  # never returns
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        _, status = os.waitpid(a, 0)
        if status != 0:
            raise OSError(f"intermediate process failed (wait status {status})")
        ready, _, _ = select.select([r], [], [], WORKER_REPORT_TIMEOUT_S)
        if not ready:
            raise TimeoutError("worker did not report its pid")
        data = os.read(r, 4096).decode("utf-8", "replace")
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    if not data:
        raise OSError("worker ended before reporting its pid")
    if not data.isdigit():
        raise OSError(data)
    return int(data)


def _worker(request: dict[str, Any], log_fd: int, report_fd: int) -> None:
    """W: attach, set up, report, then run the runner. Never returns."""
    import resource

    from supervisord_qnx.partition import process
    from supervisord_qnx.wasm import outcome, runner

    t0 = time.perf_counter()
    try:
        plan = request["plan"]
        me = str(os.getpid()).encode()
        # Attach first: nothing below may run outside the tenant's partition.
        for path in plan.get("procs", ()):
            f = os.open(path, os.O_WRONLY)
            try:
                os.write(f, me)
            finally:
                os.close(f)
        for res, value in plan.get("rlimits", ()):
            resource.setrlimit(int(res), (int(value), int(value)))
        tag = plan.get("env", {}).get(TAG)
        if tag is not None:
            _retag(tag)
        os.setsid()
        # Identity, privileges, scheduling: after the attach (which may need them),
        # before any tenant code, as the exec wrappers do for other workers.
        process.apply_self(process.ProcessSettings.from_dict(plan.get("process", {})))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(plan.get("env", {}))
    except Exception as exc:  # noqa: BLE001 - the worker reports any setup failure
        os.write(report_fd, f"worker setup failed: {exc}".encode()[:4000])
        os._exit(outcome.EXIT_RUNNER_ERROR)
    os.write(report_fd, me)
    # The server's socket to the daemon, this pipe, the received log fd: none of it
    # is the tenant's business.
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)
    probe = os.environ.get(PROBE_ENV)
    if probe:
        _write_probe(probe)
    # load_ms in the report measures this start, not the server's age.
    runner._T0 = t0  # noqa: SLF001 - the runner's start clock, reset for this worker
    code = outcome.EXIT_RUNNER_ERROR
    try:
        runner.main(list(request["argv"]))  # ends with os._exit on every normal path
    except SystemExit as exc:  # argparse errors, an unopenable report
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a forked worker must never return to the server
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _retag(value: str) -> None:
    """Make ``/proc/self/environ`` carry the worker's leaf tag.

    The portable (and QNX) accounting finds a worker's processes by the tag in
    ``/proc/<pid>/environ``, which shows the environment block the process was
    *exec'd* with; ``os.environ``/``putenv`` never change it, and W is never exec'd.
    So the server is started with the tag set to a placeholder (``TAG_SLOT``) and W
    overwrites that placeholder's bytes in place, in its own initial environment
    block (still where libc's ``environ`` points: nothing in the server calls
    ``putenv`` before the fork). The bytes after the new value's NUL are left as a
    key-less remnant, which tag readers skip.
    """
    import ctypes

    key = f"{TAG}=".encode()
    new = value.encode() + b"\0"
    if len(new) > len(TAG_SLOT):
        raise OSError(f"leaf tag too long for the fork server's slot: {value!r}")
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    i = 0
    while (addr := environ[i]) is not None:
        entry = ctypes.string_at(addr)
        if entry == key + TAG_SLOT.encode():
            ctypes.memmove(addr + len(key), new, len(new))
            break
        i += 1
    else:
        raise OSError("no leaf-tag slot in the fork server's environment")
    if read_tag(os.getpid()) != value:
        raise OSError("leaf tag not visible in /proc/self/environ")


def _write_probe(path: str) -> None:
    try:
        cgroups = Path("/proc/self/cgroup").read_text()
    except OSError:
        cgroups = ""
    # The tag as the backend reads it, not as os.environ says.
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "cgroup": cgroups, "tag": read_tag(os.getpid())}, f)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {__name__}")
    p.add_argument("--fd", type=int, required=True, help="the SOCK_SEQPACKET end to serve")
    opts = p.parse_args(argv)
    serve(opts.fd)
    print(f"wasm fork server {os.getpid()}: daemon closed the connection, exiting", flush=True)


if __name__ == "__main__":
    main()
