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

from supervisord_qnx.cli import run as run_cli
from supervisord_qnx.control.client import (
    Client,
    DaemonUnreachable,
    SubscriptionOverflow,
    table_rows,
)
from supervisord_qnx.control.rpc import ErrorCode, RpcError
from supervisord_qnx.partition import realtime

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
# 5 means, for the one command that can end so: events -f, the daemon dropped this
# follower for falling behind; reload, applied but the OS refused some resizes.
EXIT_DROPPED = 5
EXIT_PARTIAL = 5
# The daemon refused: the caller's role (docs/security.md) does not allow the command.
EXIT_DENIED = 6

DEFAULT_SOCKET = os.environ.get("SUPERVISORD_QNX_SOCKET", "run/control.sock")

EPILOG = """\
commands:
  status [TENANT]              every worker: state, pid, partition, restarts, exit reason
  start TENANT [--wait]        start a tenant's workers (--wait: until each settled)
  stop TENANT [--no-wait]      stop them: stop_signal, SIGKILL after stop_timeout
  restart TENANT [--wait]      stop, then start
  partitions [PARTITION]       the partition tree (or one subtree) with limits and usage
  logs TENANT [WORKER] [-n N]  the last N lines of each worker's log
  events [-n N] [--kind K ...] [--tenant T ...]
                               recent daemon events (state changes, restarts, limits)
  events -f [--kind K ...] [--tenant T ...]
                               follow events live until Ctrl-C (--json: one object a line)
  attach PARTITION PID         move a running process into a partition
  detach PID                   move it back out
  metrics                      Prometheus text exposition of workers, partitions, requests
                               (--json: a list of samples {name, labels, value, type})
  run -p PARTITION [--memory-max SIZE] [--timeout S] -- CMD ARGS
                               a one-shot job in a new partition; streams its output and
                               exits with its code (`run --help` lists the codes)
  job ID                       follow a job's output; exit with its code
  reload [--dry-run]           re-read every file, apply only the difference (as SIGHUP)
  set PARTITION --memory-max S ...  change a live partition's limits until the next reload
  reexec                       re-execute the daemon in place (same pid; workers keep
                               running and are adopted); install an upgrade this way
  ping | version | shutdown

exit codes: 0 ok (for `events -f`: stopped with Ctrl-C); 1 the daemon answered with
an error (message printed; for an invalid config every problem as `file: key: reason`,
and nothing changed); 2 usage; 3 `status`: some listed worker is not running;
4 daemon unreachable (for `events -f`: also when it goes away while followed);
5 `events -f`: the daemon dropped this follower because it fell more than
[daemon] subscriber_queue events behind (the count is printed); `reload`: applied,
but the OS refused some resizes (those partitions keep their previous limits; listed
under "failed"); 6 permission denied: your uid's role ([[control.grant]] in the
daemon config, docs/security.md) does not allow this command (or this tenant).
`run` and `job` exit with the job's code (`run --help`).

examples:
  supervisorctl-qnx --socket run/control.sock status
  supervisorctl-qnx restart alpha --wait
  supervisorctl-qnx reload --dry-run          what a reload would change, changing nothing
  supervisorctl-qnx set tenants/alpha --memory-max 64MiB --pids-max 50
  supervisorctl-qnx --json status | jq '.[] | select(.state != "running")'
  supervisorctl-qnx metrics | grep '^supervisord_qnx_partition_memory_current_bytes'
  supervisorctl-qnx events -f --tenant alpha --kind state --kind fatal
  supervisorctl-qnx --json events -f | jq -c 'select(.kind == "oom-kill")'
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
    s = sub.add_parser("partitions", help="show the partition tree and usage")
    s.add_argument(
        "partition", nargs="?", help="only this partition and those below it (e.g. tenants/web)"
    )
    s = sub.add_parser("logs", help="show worker logs")
    s.add_argument("tenant")
    s.add_argument("worker", nargs="?")
    s.add_argument("-n", "--lines", type=int, default=20)
    s = sub.add_parser(
        "events",
        help="show recent events, or follow them live (-f)",
        description="Without -f: the daemon's latest events, oldest first. With -f: every "
        "event from now on as it happens, until Ctrl-C (exit 0). Kinds include state, "
        "restart, fatal, memory-pressure, memory-limit, oom-kill, partition-recreated, "
        "attach, detach. An event belongs to a tenant through its worker (tenant:leaf) or "
        "its partition (tenants/alpha and below).",
        epilog="exit codes with -f: 0 stopped with Ctrl-C (or the reader of the output went "
        "away); 1 the daemon refused the subscription; 4 the daemon is unreachable or went "
        "away; 5 the daemon dropped this follower for falling more than [daemon] "
        "subscriber_queue events behind; 6 permission denied (no role on this daemon).",
    )
    # Also after the command (`events -f --json`), as scripts tend to write it.
    s.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON object per event and line",
    )
    s.add_argument("-n", "--limit", type=int, default=30, help="without -f: how many")
    s.add_argument("-f", "--follow", action="store_true", help="follow live events until Ctrl-C")
    s.add_argument("--kind", action="append", metavar="K", help="only this kind (repeat for more)")
    s.add_argument(
        "--tenant", action="append", metavar="T", help="only this tenant's (repeat for more)"
    )
    s = sub.add_parser("attach", help="move a process into a partition")
    s.add_argument("partition")
    s.add_argument("pid", type=int)
    s = sub.add_parser("detach", help="move a process out of its partition")
    s.add_argument("pid", type=int)
    sub.add_parser(
        "metrics",
        help="Prometheus text exposition (docs/metrics.md); with --json, parsed samples",
    )
    run_cli.add_parsers(sub)
    s = sub.add_parser(
        "reload",
        help="re-read the config and tenant files and apply only the difference",
        description="Re-read every file and validate everything (as at start-up); if "
        "anything is invalid nothing changes and every problem is listed. Otherwise apply "
        "only the difference: start added tenants, stop removed ones, restart only workers "
        "whose definition changed, resize partitions in place (no restart). Limits set "
        "with `set` are dropped. Sending SIGHUP to the daemon does the same.",
    )
    s.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    s = sub.add_parser(
        "set",
        help="change a live partition's limits until the next reload",
        description="Change a live partition's limits in place, like `systemctl "
        "set-property --runtime`: checked against the admission rules of the tree, "
        "written to the kernel (no process restarted), shown by `partitions` as an "
        "override, and dropped by the next reload (the files are unchanged). Sizes take "
        "'64MiB', '512K' or bytes; CPU figures are percent of the machine; 'none' "
        "removes a maximum.",
    )
    s.add_argument("partition", help="a partition path, e.g. tenants/alpha")
    s.add_argument("--memory-min", metavar="SIZE")
    s.add_argument("--memory-max", metavar="SIZE", help="hard cap, or 'none'")
    s.add_argument("--memory-reserved", metavar="SIZE", help="pressure band below the max")
    s.add_argument("--cpu-budget", metavar="PERCENT", help="guaranteed share, or 'none'")
    s.add_argument("--cpu-max", metavar="PERCENT", help="ceiling, or 'none'")
    s.add_argument("--pids-max", metavar="N", type=int, help="most tasks at once")
    sub.add_parser(
        "reexec",
        help="re-execute the daemon in place (an upgrade without stopping tenants)",
        description="Ask the daemon to save its runtime state and execve itself: the same "
        "pid (systemd and SLM see no change), the program as installed now, every worker "
        "left running and adopted by the new image. Exit 0 once the daemon accepted; "
        "control clients connected meanwhile lose their connection and must reconnect. "
        "The same as sending the daemon SIGUSR2.",
    )
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
    if c == "partitions":
        return c, ({"partition": args.partition} if args.partition else {})
    if c == "logs":
        params: dict[str, Any] = {"tenant": args.tenant, "lines": args.lines}
        if args.worker:
            params["worker"] = args.worker
        return c, params
    if c == "events":
        return c, _events_params(args)
    if c == "attach":
        return c, {"partition": args.partition, "pid": args.pid}
    if c == "detach":
        return c, {"pid": args.pid}
    if c == "reload":
        return c, ({"dry_run": True} if args.dry_run else {})
    if c == "set":
        return c, _set_params(args)
    return c, {}


def _events_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": args.limit}
    if args.kind:
        params["topics"] = args.kind
    if args.tenant:
        params["tenants"] = args.tenant
    return params


def _none_or(value: str | None, convert: Callable[[str], Any]) -> Any:
    return None if value is None or value.lower() == "none" else convert(value)


def _set_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"partition": args.partition}
    memory = {
        key: (None if value.lower() == "none" else value)
        for key, value in (
            ("min", args.memory_min), ("max", args.memory_max), ("reserved", args.memory_reserved)
        )
        if value is not None
    }  # fmt: skip
    cpu = {
        key: _none_or(value, float)
        for key, value in (("budget", args.cpu_budget), ("max", args.cpu_max))
        if value is not None
    }
    if memory:
        params["memory"] = memory
    if cpu:
        params["cpu"] = cpu
    if args.pids_max is not None:
        params["pids"] = args.pids_max
    if len(params) == 1:
        raise SystemExit(
            "supervisorctl-qnx set: give at least one of --memory-*, --cpu-*, --pids-max"
        )
    return params


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "events" and args.follow:
        return follow_events(args)
    if args.command in ("run", "job"):
        return run_cli.main(args)
    method, params = request_for(args)
    # The table for people: the same rows in the compact form (docs/protocol.md), cheaper
    # for a daemon with thousands of workers; `--json` keeps the maps scripts read.
    table = method == "status" and not args.json
    result: Any
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            if table:
                result = table_rows(client.call(method, **params, table=True))
            else:
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
        return EXIT_DENIED if exc.code == ErrorCode.PERMISSION_DENIED else EXIT_ERROR
    if args.json and method == "metrics":
        print(json.dumps(_metric_samples(result), indent=2))
    elif args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        RENDER.get(method, _render_plain)(result)
    if method == "status" and any(w["state"] != "running" for w in result):
        return EXIT_NOT_RUNNING
    if method == "reload" and result.get("failed"):
        return EXIT_PARTIAL
    return EXIT_OK


def follow_events(args: argparse.Namespace) -> int:
    """``events -f``: print each live event as it comes, until Ctrl-C or the daemon ends it."""
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            client.subscribe(topics=args.kind, tenants=args.tenant)
            # On stderr, so that it never mixes with the events a script reads; it also
            # tells a script that nothing from here on can be missed.
            print(f"following events on {args.socket} (Ctrl-C to stop)", file=sys.stderr)
            sys.stderr.flush()
            for record in client.stream():
                line = json.dumps(record, default=str) if args.json else _event_line(record)
                print(line, flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader of our output went away (`| head`): that is the end, not an error.
        _silence_stdout()
        return EXIT_OK
    except SubscriptionOverflow as exc:
        print(f"supervisorctl-qnx: events: {exc}", file=sys.stderr)
        return EXIT_DROPPED
    except DaemonUnreachable as exc:
        print(f"supervisorctl-qnx: events: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RpcError as exc:
        print(f"supervisorctl-qnx: events: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_DENIED if exc.code == ErrorCode.PERMISSION_DENIED else EXIT_ERROR
    return EXIT_OK  # not reached: the stream ends only by an exception


def _silence_stdout() -> None:
    # Python would complain again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _event_line(e: dict[str, Any]) -> str:
    """One event for a human: time, kind, what it is about, then its other fields."""
    import time

    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    stamp += f".{int(e['time'] % 1 * 1000):03d}"
    subject_key = next((k for k in ("worker", "partition") if e.get(k)), None)
    subject = str(e[subject_key]) if subject_key else "-"
    skip = {"seq", "time", "kind", subject_key}
    rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip and v is not None)
    return f"{stamp} {e['kind']:<19} {subject:<24} {rest}".rstrip()


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
    # Scheduling as the kernel reports it (docs/realtime.md); the columns only appear
    # when some worker runs with other than the defaults.
    every = realtime.format_cpulist(realtime.host_cpus())  # once, not per worker
    sched = any(_non_default_sched(w.get("sched"), every) for w in result)
    if sched:
        rows[0] += ["SCHED", "CPUS"]
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
        if sched:
            rows[-1] += _sched_cells(w.get("sched"))
        if said:
            rows[-1].append(w.get("status_text") or "-")
    _table(rows)


def _non_default_sched(s: dict[str, Any] | None, every: str) -> bool:
    if not s:
        return False
    return bool(s["policy"] != "other" or s["nice"] != 0 or s["cpus"] != every)


def _sched_cells(s: dict[str, Any] | None) -> list[str]:
    if not s:
        return ["-", "-"]
    policy = s["policy"]
    if policy in realtime.REALTIME:
        policy += f"/{s['priority']}"
    elif s["nice"]:
        policy += f" nice {s['nice']}"
    return [policy, s["cpus"]]


def _size(value: Any) -> str:
    if value is None:
        return "-"
    from supervisord_qnx.units import format_size

    return format_size(int(value))


def _render_partitions(result: dict[str, Any]) -> None:
    print(f"backend: {result['backend']}")
    rows = [["PARTITION", "MIN", "MAX", "RESERVED", "CPU", "CPU MAX", "MEM NOW", "PEAK", "PIDS"]]
    # The CPUs each partition may use, when any partition narrows them (docs/realtime.md).
    cpusets = _any_cpuset(result["tree"])
    if cpusets:
        rows[0].append("CPUSET")

    def walk(node: dict[str, Any], depth: int) -> None:
        if node["path"]:
            lim, use = node["limits"], node.get("usage") or {}
            cpu = lim["cpu"]
            rows.append(
                [
                    "  " * (depth - 1)
                    + node["name"]
                    + (" (tenant)" if node.get("tenant") else "")
                    + (" *" if node.get("override") else ""),
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
            if cpusets:
                rows[-1].append(node.get("cpuset") or "all")
        for child in node["children"]:
            walk(child, depth + 1)

    # A subtree (`partitions PARTITION`) starts at its own partition, shown unindented.
    walk(result["tree"], 1 if result["tree"]["path"] else 0)
    _table(rows)
    if any(row[0].endswith(" *") for row in rows):
        print("* limits changed with `set`, in force until the next reload")
    if result.get("unenforced"):
        print("not enforced by this backend:")
        for item in result["unenforced"]:
            print(f"  {item['partition']}: {item['control']}")


def _any_cpuset(node: dict[str, Any]) -> bool:
    return bool(node.get("cpuset")) or any(_any_cpuset(c) for c in node["children"])


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


def _metric_samples(text: str) -> list[dict[str, Any]]:
    """The exposition as data for scripts: one entry per sample, parsed by the library
    that wrote it (imported here only: the other commands stay quick to start)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        {"name": s.name, "labels": s.labels, "value": s.value, "type": family.type}
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _render_text(result: str) -> None:
    print(result, end="")


def _figure(name: str, value: Any) -> str:
    if value is None:
        return "none"
    if name.startswith("memory."):
        return _size(value)
    if name.startswith("cpu."):
        return f"{value:g}%"
    return str(value)


def _changes(changes: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {', '.join(v[0]) or '-'} -> {', '.join(v[1]) or '-'}"
        if k == "flags"
        else f"{k} {_figure(k, v[0])} -> {_figure(k, v[1])}"
        for k, v in changes.items()
    )


def _render_reload(result: dict[str, Any]) -> None:
    if result.get("dry_run"):
        print("dry run: nothing was changed; a reload would do this:")
    for key in ("added", "removed", "restarted", "resized", "unchanged"):
        group = result[key]
        names = " ".join(group["names"]) if group["names"] else "-"
        print(f"{key + ':':<11}{group['count']:>3}  {names}")
        if key == "resized":
            for path, changes in group.get("changes", {}).items():
                print(f"  {path}: {_changes(changes)}")
    for name, (old, new) in result.get("scaled", {}).items():
        print(f"scaled:         {name} instances {old} -> {new}")
    for failure in result.get("failed", []):
        print(f"FAILED:         {failure['partition']}: {failure['reason']}")
    for note in result.get("not_applied", []):
        print(f"not applied:    {note}")
    if result.get("overrides_dropped"):
        verb = "would drop" if result.get("dry_run") else "dropped"
        print(f"overrides {verb} (set at runtime): {' '.join(result['overrides_dropped'])}")


def _render_set(result: dict[str, Any]) -> None:
    changes = result["changes"]
    what = _changes(changes) if changes else "no figure changed"
    print(f"{result['partition']}: {what}")
    print(f"({result['note']})")


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
    "metrics": _render_text,
    "reload": _render_reload,
    "set": _render_set,
}


if __name__ == "__main__":
    sys.exit(main())
