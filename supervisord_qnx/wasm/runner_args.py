"""The wasm runner's command line as one type, shared by the daemon that builds it and the
runner that parses it (``to_argv`` and ``parse`` are each other's inverse; a test holds
them to it). Stdlib only: the runner imports it before wasmtime, and nothing else.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class RunnerArgs:
    module: str  # .wasm binary or .wat text
    arg: tuple[str, ...] = ()  # guest argv[1:]
    env: tuple[tuple[str, str], ...] = ()
    preopen: tuple[tuple[str, str], ...] = ()  # (guest dir, host dir)
    memory: int | None = None  # linear memory cap in bytes
    tables: int | None = None
    instances: int | None = None
    fuel: int | None = None
    timeout: float | None = None  # epoch deadline, seconds
    cache_dir: str | None = None
    no_cache: bool = False
    report: str | None = None

    def to_argv(self) -> list[str]:
        """The arguments after ``python -m supervisord_qnx.wasm.runner``."""
        argv = ["--module", self.module]
        for a in self.arg:
            argv += ["--arg", a]
        for k, v in self.env:
            argv += ["--env", f"{k}={v}"]
        for guest, host in self.preopen:
            argv += ["--preopen", f"{guest}={host}"]
        for flag, value in (
            ("--memory", self.memory),
            ("--tables", self.tables),
            ("--instances", self.instances),
            ("--fuel", self.fuel),
            ("--timeout", self.timeout),
            ("--cache-dir", self.cache_dir),
            ("--report", self.report),
        ):
            if value is not None:
                argv += [flag, str(value)]
        if self.no_cache:
            argv.append("--no-cache")
        return argv

    @classmethod
    def parse(cls, argv: Sequence[str]) -> RunnerArgs:
        """Parse a runner command line (exits with a usage message on a bad one)."""
        ns = build_parser().parse_args(list(argv))
        return cls(
            module=ns.module,
            arg=tuple(ns.arg),
            env=tuple(ns.env),
            preopen=tuple(ns.preopen),
            memory=ns.memory,
            tables=ns.tables,
            instances=ns.instances,
            fuel=ns.fuel,
            timeout=ns.timeout,
            cache_dir=ns.cache_dir,
            no_cache=ns.no_cache,
            report=ns.report,
        )


def parse_size(text: str) -> int:
    """Bytes from ``16777216``, ``16MiB``, ``16M`` or ``64k`` (binary multiples)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in _SIZE_SUFFIXES:
        mult = _SIZE_SUFFIXES[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m supervisord_qnx.wasm.runner",
        description="Run one WASI command module under wasmtime with engine-enforced limits.",
    )
    p.add_argument("--module", required=True, help=".wasm binary or .wat text")
    p.add_argument("--arg", action="append", default=[], help="guest argv[1:], repeatable")
    p.add_argument("--env", action="append", default=[], type=_pair, help="K=V, repeatable")
    p.add_argument(
        "--preopen", action="append", default=[], type=_pair, help="GUEST=HOST dir, repeatable"
    )
    p.add_argument("--memory", type=parse_size, help="linear memory cap in bytes")
    p.add_argument("--tables", type=_positive_int, help="max table elements")
    p.add_argument("--instances", type=_positive_int, help="max instances")
    p.add_argument("--fuel", type=_positive_int, help="wasmtime fuel units")
    p.add_argument("--timeout", type=_positive_float, help="epoch deadline in seconds")
    p.add_argument("--cache-dir", help="compiled-module cache (default: $XDG_CACHE_HOME/...)")
    p.add_argument("--no-cache", action="store_true", help="compile in memory every time")
    p.add_argument("--report", help="append JSON-lines outcome events to this file")
    return p
