"""Config-time check of a wasm worker's module file: does it decode as WebAssembly?

Called by the config loader (``config/load.py``) so that a tenant file naming a
corrupt module is refused by ``--check`` and at load, with the file named,
instead of starting a worker that can only fail. Only the daemon and the CLI
import this (and with it wasmtime); the runner never does.

Cheap on purpose: ``wat2wasm`` for text and ``Module.validate`` for binaries
decode and type-check the module without compiling it to native code, so the
cost is a few milliseconds even for a large module. What only instantiation can
tell (imports the runner does not provide, a missing ``_start``, a memory
minimum above the cap) is still found at start, as an ``invalid-module:`` exit
that the supervisor does not restart.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

_engine: wasmtime.Engine | None = None


def _shared_engine() -> wasmtime.Engine:
    # One engine for every check in this process: an Engine costs a few ms to build.
    global _engine
    if _engine is None:
        _engine = wasmtime.Engine()
    return _engine


def module_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable wasm module (one line), or None when it decodes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        if path.suffix == ".wat":
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return "invalid module: .wat file is not UTF-8 text"
            data = bytes(wasmtime.wat2wasm(text))
        wasmtime.Module.validate(_shared_engine(), data)
    except wasmtime.WasmtimeError as e:
        return f"invalid module: {one_line(str(e))}"
    return None


def one_line(message: str) -> str:
    """wasmtime's decoder errors span lines (a byte dump, or a source excerpt under a
    ``--> <anon>:LINE:COL`` marker): keep the sentence and the location."""
    lines = [ln.strip() for ln in message.splitlines()]
    head: list[str] = []
    where = ""
    for ln in lines:
        if ln.startswith("-->"):
            _, _, pos = ln.partition("<anon>:")
            where = f" (at line {pos.replace(':', ', column ')})" if pos else ""
            break
        head.append(ln)
    text = " ".join(" ".join(head).split())
    return (text[:200] + "...") if len(text) > 200 else text + where
