"""``supervisorctl-qnx``: control a running supervisord-qnx over its socket.

Imports stay light (no trio, no pydantic) so that every command starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from supervisord_qnx.control.client import Client, DaemonUnreachable
from supervisord_qnx.control.rpc import RpcError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 1, 2, 3, 4

DEFAULT_SOCKET = os.environ.get("SUPERVISORD_QNX_SOCKET", "run/control.sock")

EPILOG = """\
commands:
  status [TENANT]              every worker: state, pid, partition, restarts, exit reason
  start TENANT [--wait]        start a tenant's workers (--wait: until each settled)
  stop TENANT [--no-wait]      stop them: stop_signal, SIGKILL after stop_timeout
  restart TENANT [--wait]      stop, then start
  partitions                   the partition tree with limits, flags and live usage
  logs TENANT [WORKER] [-n N]  the last N lines of each worker's log
  events [-n N] [--kind K]     recent daemon events (state changes, restarts, limits)
  attach PARTITION PID         move a running process into a partition
  detach PID                   move it back out
  ping | version | shutdown

exit codes: 0 ok; 1 the daemon answered with an error (message printed);
2 usage; 3 `status`: some listed worker is not running; 4 daemon unreachable.

examples:
  supervisorctl-qnx --socket run/control.sock status
  supervisorctl-qnx restart alpha --wait
  supervisorctl-qnx --json status | jq '.[] | select(.state != "running")'
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supervisorctl-qnx",
        description="Control a running supervisord-qnx daemon over its msgpack-RPC socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--socket",
        "-s",
        default=DEFAULT_SOCKET,
        help="control socket (default: %(default)s, or $SUPERVISORD_QNX_SOCKET)",
    )
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for an answer (default 60)"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("status", help="show workers")
    s.add_argument("tenant", nargs="?")
    for name, helptext in (("start", "start a tenant"), ("restart", "restart a tenant")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("tenant")
        s.add_argument("--wait", action="store_true", help="return once every worker settled")
    s = sub.add_parser("stop", help="stop a tenant")
    s.add_argument("tenant")
    s.add_argument("--no-wait", action="store_true", help="return at once")
    sub.add_parser("partitions", help="show the partition tree and usage")
    s = sub.add_parser("logs", help="show worker logs")
    s.add_argument("tenant")
    s.add_argument("worker", nargs="?")
    s.add_argument("-n", "--lines", type=int, default=20)
    s = sub.add_parser("events", help="show recent events")
    s.add_argument("-n", "--limit", type=int, default=30)
    s.add_argument("--kind")
    s = sub.add_parser("attach", help="move a process into a partition")
    s.add_argument("partition")
    s.add_argument("pid", type=int)
    s = sub.add_parser("detach", help="move a process out of its partition")
    s.add_argument("pid", type=int)
    for name in ("ping", "version", "shutdown"):
        sub.add_parser(name, help=f"{name} the daemon")
    return p


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    c = args.command
    if c == "status":
        return c, ({"tenant": args.tenant} if args.tenant else {})
    if c in ("start", "restart"):
        return c, {"tenant": args.tenant, "wait": args.wait}
    if c == "stop":
        return c, {"tenant": args.tenant, "wait": not args.no_wait}
    if c == "logs":
        params: dict[str, Any] = {"tenant": args.tenant, "lines": args.lines}
        if args.worker:
            params["worker"] = args.worker
        return c, params
    if c == "events":
        params = {"limit": args.limit}
        if args.kind:
            params["kind"] = args.kind
        return c, params
    if c == "attach":
        return c, {"partition": args.partition, "pid": args.pid}
    if c == "detach":
        return c, {"pid": args.pid}
    return c, {}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    method, params = request_for(args)
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            result = client.call(method, **params)
    except DaemonUnreachable as exc:
        print(f"supervisorctl-qnx: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RpcError as exc:
        if args.json:
            print(json.dumps({"error": exc.to_wire()}, indent=2))
        else:
            print(f"supervisorctl-qnx: {method}: {exc.message} ({exc.code})", file=sys.stderr)
            for problem in exc.data.get("problems", []):
                print(f"  {problem}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        RENDER.get(method, _render_plain)(result)
    if method == "status" and any(w["state"] != "running" for w in result):
        return EXIT_NOT_RUNNING
    return EXIT_OK


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02}:{m:02}:{s:02}" if d else f"{h:02}:{m:02}:{s:02}"


def _render_workers(result: list[dict[str, Any]]) -> None:
    rows = [["WORKER", "STATE", "PID", "PARTITION", "RESTARTS", "UPTIME", "EXIT REASON"]]
    # What workers said with sd_notify's STATUS=, as `systemctl status` shows it; the
    # column only appears when one did.
    said = any(w.get("status_text") for w in result)
    if said:
        rows[0].append("STATUS")
    live = ("starting", "running", "stopping")  # a `ready = "notify"` worker starts with a pid
    for w in result:
        reason = w.get("exit_reason") or "-"
        if w.get("memory_denied"):
            reason += f" (memory.grow denied {w['memory_denied']}x)"
        rows.append(
            [
                w["name"],
                w["state"],
                str(w["pid"]) if w["pid"] and w["state"] in live else "-",
                w["partition"],
                str(w["restarts"]),
                _duration(w.get("uptime")),
                reason,
            ]
        )
        if said:
            rows[-1].append(w.get("status_text") or "-")
    _table(rows)


def _size(value: Any) -> str:
    if value is None:
        return "-"
    from supervisord_qnx.units import format_size

    return format_size(int(value))


def _render_partitions(result: dict[str, Any]) -> None:
    print(f"backend: {result['backend']}")
    rows = [["PARTITION", "MIN", "MAX", "RESERVED", "CPU", "CPU MAX", "MEM NOW", "PEAK", "PIDS"]]

    def walk(node: dict[str, Any], depth: int) -> None:
        if node["path"]:
            lim, use = node["limits"], node.get("usage") or {}
            cpu = lim["cpu"]
            rows.append(
                [
                    "  " * (depth - 1) + node["name"] + (" (tenant)" if node.get("tenant") else ""),
                    _size(lim["memory"]["min"]) if lim["memory"]["min"] else "-",
                    _size(lim["memory"]["max"]),
                    _size(lim["memory"]["reserved"]) if lim["memory"]["reserved"] else "-",
                    f"{cpu['budget']:g}%" if cpu["budget"] is not None else "-",
                    f"{cpu['max']:g}%" if cpu["max"] is not None else "-",
                    _size(use.get("memory_current")),
                    _size(use.get("memory_peak")),
                    str(use.get("pids_current", "-")),
                ]
            )
        for child in node["children"]:
            walk(child, depth + 1)

    walk(result["tree"], 0)
    _table(rows)
    if result.get("unenforced"):
        print("not enforced by this backend:")
        for item in result["unenforced"]:
            print(f"  {item['partition']}: {item['control']}")


def _render_logs(result: list[dict[str, Any]]) -> None:
    for entry in result:
        print(f"==> {entry['worker']} ({entry['file']}) <==")
        for line in entry["lines"]:
            print(line)


def _render_events(result: list[dict[str, Any]]) -> None:
    import time

    for e in result:
        stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("seq", "time", "kind"))
        print(f"{stamp} {e['kind']:<16} {rest}")


def _render_plain(result: Any) -> None:
    if isinstance(result, dict):
        for k, v in result.items():
            print(f"{k}: {v}")
    else:
        print(result)


RENDER: dict[str, Callable[[Any], None]] = {
    "status": _render_workers,
    "start": _render_workers,
    "stop": _render_workers,
    "restart": _render_workers,
    "partitions": _render_partitions,
    "logs": _render_logs,
    "events": _render_events,
}


if __name__ == "__main__":
    sys.exit(main())
