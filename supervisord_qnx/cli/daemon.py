"""``supervisord-qnx``: run the daemon, or ``--check`` a configuration.

Exit codes: 0 ok; 2 the configuration (or the chosen backend) has problems,
each printed as ``file: key: reason``; 3 cannot start because another daemon
owns the socket, the state directory or the partition root (it is left
untouched); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_RUNNING = 0, 1, 2, 3

DEFAULT_CONFIG = os.environ.get("SUPERVISORD_QNX_CONFIG", "config/supervisord.toml")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="supervisord-qnx",
        description=(
            "Run WebAssembly and command tenants side by side, each inside its own "
            "resource partition (cgroups on Linux, APS + rlimits on QNX), restart them "
            "by policy, and serve a msgpack-RPC control socket."
        ),
        epilog=(
            "examples:\n"
            "  supervisord-qnx --config config/supervisord.toml          run in the foreground\n"
            "  supervisord-qnx --config config/supervisord.toml --check  validate, show the tree\n"
            "  supervisord-qnx --check --json | jq .tree                 the same, for scripts\n"
            "\nexit codes: 0 ok, 2 configuration problems, 3 cannot start: another daemon owns\n"
            "the control socket, the state directory or the cgroup root (it is left\n"
            "untouched), 1 other errors.\n"
            "Control a running daemon with supervisorctl-qnx."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help="daemon config file (default: %(default)s, or $SUPERVISORD_QNX_CONFIG)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config and tenant files, print the partition tree and what the "
        "backend enforces, and exit (0 ok, 2 problems)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "portable", "cgroup1", "cgroup2", "qnx"],
        help="override [daemon] backend from the config",
    )
    p.add_argument("--json", action="store_true", help="with --check: machine-readable output")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything imports trio, structlog or pydantic (supervisord_qnx/lazymod.py),
    # and before argparse, whose help formatter imports shutil (and shutil bz2 and lzma).
    from supervisord_qnx.lazymod import DAEMON_DEFERRED, defer

    defer(*DAEMON_DEFERRED)
    args = parser().parse_args(argv)
    # Must run before anything imports trio: on QNX it installs the poll(2) back end.
    io_backend = _select_io()
    from supervisord_qnx import __version__

    if args.version:
        print(f"supervisord-qnx {__version__}")
        return EXIT_OK

    from supervisord_qnx.lazymod import no_pydantic_plugins

    no_pydantic_plugins()  # before the first model is built (importlib.metadata stays out)
    from supervisord_qnx.config.load import ConfigError, load
    from supervisord_qnx.partition.backend import BackendUnavailable

    try:
        config = load(args.config)
    except ConfigError as exc:
        return _report_problems(exc, args.json)

    from supervisord_qnx import daemon as d

    try:
        backend = d.make_backend(config, args.backend)
        tree, warnings = d.admit(config, backend)
    except BackendUnavailable as exc:
        print(f"{config.path}: daemon.backend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        return _report_problems(exc, args.json)

    if args.check:
        # The daemon raises its soft limit to the hard one at start: the hard one counts.
        problem = d.fd_limit_problem(config, backend.name, len(tree))
        _print_check(config, backend, tree, [*warnings, *([problem] if problem else [])], args.json)
        return EXIT_OK

    import trio

    from supervisord_qnx import memtrim

    memtrim.limit_arenas()  # before the daemon's first thread (memtrim.py)
    d.configure_logging(config.daemon.log_format, config.daemon.log_level)
    # Process-wide and for good: whatever the service manager left (even 000), files
    # the daemon creates are not for others (docs/security.md, "Files and directories").
    os.umask(d.daemon_umask(config))
    daemon = d.Daemon(config, backend, tree, warnings)
    daemon.io_backend = io_backend
    from supervisord_qnx import memprobe

    memprobe.start_from_env()  # a diagnostic, off unless asked for (docs/reliability.md)
    try:
        trio.run(daemon.run)
        _exit_after_shutdown(EXIT_OK)
    except (d.AlreadyRunning, d.InUse) as exc:
        print(f"supervisord-qnx: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except d.UnsafePath as exc:
        print(f"supervisord-qnx: refusing to start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BaseExceptionGroup as group:
        # Failures inside the daemon's nursery arrive grouped; report the operator's
        # kind (socket taken, socket path unusable) plainly, re-raise anything else.
        running, rest = group.split((d.AlreadyRunning, d.InUse))
        if running is not None:
            print(f"supervisord-qnx: {running.exceptions[0]}", file=sys.stderr)
            return EXIT_RUNNING
        serve, rest = group.split(d.ServeError)
        if serve is not None and rest is None:
            print(f"supervisord-qnx: {serve.exceptions[0]}", file=sys.stderr)
            return EXIT_ERROR
        raise
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _select_io() -> str:
    from supervisord_qnx.iomanager import select_io_backend

    return select_io_backend()


def _exit_after_shutdown(code: int) -> NoReturn:
    """End the process once the daemon shut down cleanly: every worker is gone, every
    partition removed, the socket and the locks released. The exit handlers run and the
    standard streams are flushed; what is skipped is the interpreter's teardown of the
    daemon's objects and modules, 0.1 s or more of a shutdown (issue 14) that nobody
    waits for. Only ever reached from the ``supervisord-qnx`` process's own ``main``."""
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers os._exit would skip
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _report_problems(exc: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "problems": [p.as_dict() for p in exc.problems]}, indent=2))
    else:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''}; nothing was started.", file=sys.stderr)
    return EXIT_CONFIG


def _print_check(config: Any, backend: Any, tree: Any, warnings: list[str], as_json: bool) -> None:
    from supervisord_qnx.config import identity
    from supervisord_qnx.config.realtime import realtime_check, realtime_lines
    from supervisord_qnx.control.report import enforcement_table
    from supervisord_qnx.units import format_size

    mapping = backend.describe(tree)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "config": str(config.path),
                    "backend": backend.name,
                    "enforcement": enforcement_table(backend),
                    "warnings": warnings,
                    "os_names": mapping,
                    "tree": tree.as_dict(),
                    "start_waves": _start_waves(config),
                    "realtime": realtime_check(config, tree),
                    "identities": identity.describe(config),
                    "identity_notes": identity.notes(config),
                },
                indent=2,
            )
        )
        return
    print(f"config:  {config.path}")
    print(f"backend: {backend.name}")
    print(f"tenants: {len(config.tenants)}   partitions: {len(tree)}")
    print()
    rows = [("PARTITION", "MIN", "MAX", "RESERVED", "CPU", "CPU MAX", "PIDS", "FLAGS", "OS NAME")]
    for node in tree:
        indent = "  " * (node.depth - 1)
        rows.append(
            (
                indent + node.name + (" (tenant)" if node.tenant else ""),
                format_size(node.memory_min) if node.memory_min else "-",
                format_size(node.memory_max),
                format_size(node.memory_reserved) if node.memory_reserved else "-",
                f"{node.cpu_budget:g}%" if node.cpu_budget is not None else "-",
                f"{node.cpu_max:g}%" if node.cpu_max is not None else "-",
                str(node.pids_max) if node.pids_max is not None else "-",
                ",".join(sorted(node.flags)) or "-",
                mapping.get(node.path, "-"),
            )
        )
    _table(rows)
    if any(t.after for t in config.tenants):
        # Only where `after` orders something: otherwise every tenant starts at once.
        print()
        print("start order (`after`; each line starts once the lines above run):")
        for i, wave in enumerate(_start_waves(config), 1):
            print(f"  {i}. {', '.join(wave)}")
    print()
    print("enforcement by this backend:")
    for control, level in enforcement_table(backend).items():
        print(f"  {control:<18} {level}")
    print()
    for line in realtime_lines(realtime_check(config, tree)):
        print(line)
    _print_identities(config)
    for w in [*warnings, *identity.notes(config)]:
        print(f"warning: {w}")


def _print_identities(config: Any) -> None:
    """Who each tenant's workers run as (docs/security.md#tenants)."""
    from supervisord_qnx.config import identity

    print()
    print("tenants run as:")
    for tenant, who in identity.describe(config).items():
        print(f"  {tenant:<24} {who}")


def _start_waves(config: Any) -> list[list[str]]:
    from supervisord_qnx.config.ordering import Ordering

    tenants = config.tenants
    return Ordering({t.name: t.after for t in tenants}).waves(t.name for t in tenants)


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
