"""Load a seccomp filter into this process, then exec the rest of the argv (same pid):
``python -I -S seccomp_exec.py <filter as hex> <program> [args...]``.

The exec wrapper for a tenant's ``seccomp`` (partition/seccomp.py compiles the filter
once in the daemon, with libseccomp; this file only loads the finished BPF program). It
runs in the worker's exec chain after the namespaces and before the privilege drop, as
the daemon's user, and the wasm fork server's children call ``load`` in-process.

Standard library only (it starts with ``-I -S``, and the package may not be on the path
of whoever runs it): ``ctypes`` for the two ``prctl`` calls Python does not wrap.
"""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_INSN_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load(program: bytes) -> None:
    """Install ``program`` (a BPF seccomp filter) for the calling thread and every process
    it execs or forks; ``OSError`` if the kernel refuses it. Sets no_new_privs first,
    which an unprivileged process needs for it (and every worker gets anyway)."""
    if not program or len(program) % _INSN_SIZE:
        raise OSError(22, f"not a BPF program ({len(program)} bytes)")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN_SIZE, ctypes.cast(buf, ctypes.c_void_p))
    for args in (
        (_PR_SET_NO_NEW_PRIVS, 1, 0),
        (_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)),
    ):
        if libc.prctl(*(ctypes.c_ulong(a) for a in args), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            err = ctypes.get_errno()
            raise OSError(err, f"prctl{args[:2]}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: seccomp_exec.py FILTER-HEX PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    try:
        load(bytes.fromhex(argv[0]))
        os.execvp(argv[1], argv[1:])
    except (OSError, ValueError) as exc:
        # As a shell would say it: the worker's log shows why it did not start.
        print(f"seccomp: {argv[1]}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 126  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
