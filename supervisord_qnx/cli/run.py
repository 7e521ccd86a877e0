"""``supervisorctl-qnx run``: a one-shot job in a partition of its own, its output streamed,
its end as the exit code (``systemd-run --wait -p MemoryMax=…`` for this daemon).

It calls ``run`` (the job starts and belongs to the daemon), then ``job`` in a loop,
each call waiting up to ``POLL_WAIT`` seconds for the end and bringing the output
written meanwhile. Interrupting the command only stops following: the job runs on to
its end or its ``--timeout`` (``supervisorctl-qnx job ID`` follows it again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from supervisord_qnx.control.client import Client, DaemonUnreachable
from supervisord_qnx.control.rpc import RpcError

# Exit codes for ends that are not the job's own status; the daemon's
# supervise/jobs.py computes them (its exit_code) and answers them as "exit_code".
CODE_NOT_RUN = 125
POLL_WAIT = 0.5

RUN_EPILOG = """\
The job runs in a new partition PARTITION/job-<id> with the limits given (each at
most the parent's; a job that does not fit is refused), its output goes to
<log_dir>/job-<id>.log and is streamed here, and the partition is removed when the
job ends. Ctrl-C stops following, not the job: it belongs to the daemon and runs to
its end or its --timeout.

exit codes:
  N        the job exited with status N
  128+N    the job was killed by signal N
  122      oom-killed: the kernel killed it at its memory max (cgroup backends)
  123      memory-limit: the daemon killed it at its memory max (portable, qnx)
  124      deadline: it ran past --timeout (or a wasm fuel/epoch deadline)
  125      the job was not run: the daemon refused it (message printed) or is
           unreachable
  126      it failed otherwise (a wasm trap, a runner or daemon failure)
  127      it could not be started (no such program, not executable)
  with --no-wait: 0 once the job runs (its id is printed), else 125.

examples:
  supervisorctl-qnx run --partition tenants/alpha --memory-max 32MiB -- python3 job.py
  supervisorctl-qnx run --partition tenants/alpha --timeout 60 --cpu-max 25 -- make -j2
  supervisorctl-qnx run --partition tenants/alpha --wasm wasm/heartbeat.wat --timeout 1
"""


def add_parsers(sub: Any) -> None:
    """The ``run`` and ``job`` subcommands (``sub``: ctl's subparsers)."""
    s = sub.add_parser(
        "run",
        help="run a one-shot job in a new partition, streaming its output",
        description="Run a one-shot job in a new leaf partition under PARTITION.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--partition", "-p", required=True, help="the parent partition")
    s.add_argument("--memory-max", metavar="SIZE", help="hard memory cap (16MiB, 1G, bytes)")
    s.add_argument("--memory-reserved", metavar="SIZE", help="pressure band below the max")
    s.add_argument("--cpu-max", metavar="PCT", type=float, help="CPU ceiling, %% of the machine")
    s.add_argument("--pids-max", metavar="N", type=int, help="most tasks at once")
    # Its own dest: the global --timeout (seconds to wait for an answer) is another thing.
    s.add_argument(
        "--timeout", dest="job_timeout", metavar="S", type=float, help="deadline in seconds"
    )
    s.add_argument("--env", "-E", metavar="K=V", action="append", default=[], help="set a variable")
    s.add_argument("--cwd", help="working directory (default: this one)")
    s.add_argument("--wasm", metavar="MODULE", help="run a WebAssembly module (ARGS are its args)")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the program")
    s = sub.add_parser(
        "job",
        help="follow a job: its output, then its end as the exit code",
        description="Print a job's output from the start, following it until it ends; "
        "exit with its code (as `run`).",
    )
    s.add_argument("id", type=int)


def run_params(args: argparse.Namespace) -> dict[str, Any]:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    params: dict[str, Any] = {"partition": args.partition}
    if args.wasm:
        params["wasm"] = os.path.abspath(args.wasm)
        params["args"] = argv
    elif argv:
        params["command"] = argv
    else:
        raise SystemExit("supervisorctl-qnx run: give a command after --, or --wasm MODULE")
    memory: dict[str, Any] = {}
    if args.memory_max is not None:
        memory["max"] = args.memory_max
    if args.memory_reserved is not None:
        memory["reserved"] = args.memory_reserved
    if memory:
        params["memory"] = memory
    if args.cpu_max is not None:
        params["cpu"] = {"max": args.cpu_max}
    if args.pids_max is not None:
        params["pids"] = args.pids_max
    if args.job_timeout is not None:
        params["timeout"] = args.job_timeout
    if args.env:
        params["env"] = _env(args.env)
    params["cwd"] = os.path.abspath(args.cwd or os.getcwd())
    return params


def _env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"supervisorctl-qnx run: --env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def main(args: argparse.Namespace) -> int:
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            if args.command == "job":
                return follow(client, args.id, args.json)
            try:
                started = client.call("run", **run_params(args))
            except RpcError as exc:
                _refused(exc, args.json)
                return CODE_NOT_RUN
            if args.no_wait:
                _print_started(started, args.json)
                return int(started["exit_code"]) if started["done"] else 0
            if not args.json and started["pid"] is not None:
                print(
                    f"supervisorctl-qnx: job {started['job']} in {started['partition']} "
                    f"(pid {started['pid']}, log {started['log']})",
                    file=sys.stderr,
                )
            return follow(client, started["job"], args.json)
    except DaemonUnreachable as exc:
        print(f"supervisorctl-qnx: {exc}", file=sys.stderr)
        return CODE_NOT_RUN
    except RpcError as exc:
        print(f"supervisorctl-qnx: {exc.message} ({exc.code})", file=sys.stderr)
        return CODE_NOT_RUN


def follow(client: Client, job_id: int, as_json: bool) -> int:
    """Stream the job's output to stdout until it ended; return its exit code."""
    offset = 0
    collected = bytearray()
    while True:
        r = client.call("job", id=job_id, offset=offset, wait=POLL_WAIT)
        chunk = bytes(r.pop("output"))
        offset = r["offset"]
        if as_json:
            collected += chunk
        elif chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        if r["done"] and not chunk:
            break
    if as_json:
        r["output"] = collected.decode("utf-8", "replace")
        print(json.dumps(r, indent=2))
    else:
        for warning in r.get("warnings", []):
            print(f"supervisorctl-qnx: warning: {warning}", file=sys.stderr)
        print(
            f"supervisorctl-qnx: job {job_id} ended: {r['exit_reason']} "
            f"(exit code {r['exit_code']})",
            file=sys.stderr,
        )
    return int(r["exit_code"])


def _refused(exc: RpcError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": exc.to_wire()}, indent=2))
        return
    print(f"supervisorctl-qnx: run: {exc.message} ({exc.code})", file=sys.stderr)
    for problem in exc.data.get("problems", []):
        print(f"  {problem}", file=sys.stderr)


def _print_started(started: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(started, indent=2))
    else:
        print(started["job"])
        print(
            f"supervisorctl-qnx: job {started['job']} in {started['partition']} "
            f"(pid {started['pid']}); follow it with `supervisorctl-qnx job {started['job']}`",
            file=sys.stderr,
        )
