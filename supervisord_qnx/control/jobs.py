"""The control methods for transient jobs: ``run`` starts one, ``job`` follows it.

Why two calls rather than one call that streams: ``run`` answers as soon as the job is
running, and ``job`` is a plain request for "its state, and its output from this
offset", so a client that disconnects loses nothing (the job is the daemon's, and its
output is in its log file), any number of clients can follow one job, and no
connection ever carries an unbounded stream. ``supervisorctl-qnx run`` calls ``job``
with ``wait`` in a loop: each call answers once the job ended or after ``wait``
seconds, with whatever output came meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import trio

from supervisord_qnx.config.model import Config
from supervisord_qnx.control.rpc import ErrorCode, RpcError
from supervisord_qnx.supervise.jobs import Job, JobNotFound, JobRefused, Jobs

T = TypeVar("T")

# The longest a ``job`` call waits for the end before answering.
MAX_WAIT = 60.0

_RUN_PARAMS = {
    "partition",
    "command",
    "wasm",
    "args",
    "memory",
    "cpu",
    "pids",
    "timeout",
    "wait",
    "env",
    "cwd",
}


def _bad(message: str) -> RpcError:
    return RpcError(ErrorCode.BAD_REQUEST, message)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_run(params: dict[str, Any]) -> dict[str, Any]:
    """The shape of ``run``'s params (their figures are the config models' business)."""
    unknown = sorted(set(params) - _RUN_PARAMS)
    if unknown:
        raise _bad(
            f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_RUN_PARAMS))}"
        )
    if not isinstance(params.get("partition"), str):
        raise _bad("parameter 'partition' must be a string naming a partition, e.g. 'tenants/a'")
    if ("command" in params) == ("wasm" in params):
        raise _bad("give exactly one of 'command' (an argv list) and 'wasm' (a module path)")
    if "command" in params and not (_str_list(params["command"]) and params["command"]):
        raise _bad("parameter 'command' must be a non-empty list of strings (the argv)")
    if "wasm" in params and not isinstance(params["wasm"], str):
        raise _bad("parameter 'wasm' must be a string: the module's path on the daemon's host")
    if "args" in params and ("wasm" not in params or not _str_list(params["args"])):
        raise _bad("parameter 'args' is a list of strings, for 'wasm' jobs (commands: argv)")
    for name in ("wasm", "cwd"):
        if isinstance(params.get(name), str) and not params[name].startswith("/"):
            raise _bad(f"parameter {name!r} must be an absolute path (the daemon has its own cwd)")
    if "cwd" in params and not isinstance(params["cwd"], str):
        raise _bad("parameter 'cwd' must be a string")
    _check_limits(params)
    return params


def _check_limits(params: dict[str, Any]) -> None:
    env = params.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        raise _bad("parameter 'env' must be a map of strings")
    if "memory" in params and not isinstance(params["memory"], int | str | dict):
        raise _bad("parameter 'memory' must be a size ('32MiB', bytes) or {min, max, reserved}")
    if "cpu" in params and not (_number(params["cpu"]) or isinstance(params["cpu"], dict)):
        raise _bad("parameter 'cpu' must be a percentage (the max) or {budget, max}")
    if "pids" in params and not (isinstance(params["pids"], int) and _number(params["pids"])):
        raise _bad("parameter 'pids' must be an integer")
    timeout = params.get("timeout")
    if timeout is not None and not (_number(timeout) and timeout > 0):
        raise _bad("parameter 'timeout' must be a positive number of seconds")
    if "wait" in params and not isinstance(params["wait"], bool):
        raise _bad("parameter 'wait' must be a boolean")


class JobsDaemon(Protocol):
    """What these methods use of the daemon (read at call time, never at construction)."""

    config: Config
    jobs: Jobs

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class JobMethods:
    """``run`` and ``job`` over the daemon's ``Jobs``; log reads run in the daemon's pool
    for slow I/O."""

    def __init__(self, daemon: JobsDaemon) -> None:
        self.daemon = daemon

    def _jobs(self) -> Jobs:
        return self.daemon.jobs

    async def run(self, params: dict[str, Any]) -> dict[str, Any]:
        p = check_run(params)
        try:
            job = await self._jobs().start(p)
        except JobRefused as exc:
            extra = {"problems": exc.problems} if exc.problems else {}
            raise RpcError(exc.code, str(exc), **extra) from None
        if p.get("wait", False):
            await job.done.wait()
        return job.result()

    async def job(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - {"id", "offset", "wait"})
        if unknown:
            raise _bad(f"unknown parameter(s) {', '.join(unknown)}; allowed: id, offset, wait")
        job_id, offset, wait = params.get("id"), params.get("offset", 0), params.get("wait", 0)
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise _bad("parameter 'id' must be an integer (the job id `run` answered)")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise _bad("parameter 'offset' must be a non-negative integer")
        if not _number(wait) or not 0 <= wait <= MAX_WAIT:
            raise _bad(f"parameter 'wait' must be a number of seconds, 0..{MAX_WAIT:g}")
        try:
            job = self._jobs().get(job_id)
        except JobNotFound as exc:
            raise RpcError(ErrorCode.NOT_FOUND, str(exc)) from None
        if wait:
            with trio.move_on_after(wait):
                await job.done.wait()
        return await self._answer(job, offset)

    async def _answer(self, job: Job, offset: int) -> dict[str, Any]:
        # The state first, then the output: a job seen as done has all its output on
        # disk by then, so a client that stops at "done and nothing more" misses nothing.
        out = job.result()
        data, _ = await self.daemon.blocking(self._jobs().read_output, job, offset)
        # Room for the rest of the answer within the message size limit.
        data = data[: max(4096, self.daemon.config.daemon.max_message_bytes // 2)]
        out["output"] = data
        out["offset"] = offset + len(data)
        return out
