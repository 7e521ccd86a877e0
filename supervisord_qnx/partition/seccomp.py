"""The tenant key ``seccomp = "default"`` (docs/security.md#seccomp): a syscall filter
that answers ``EPERM`` to the calls a tenant never needs (loading kernel code, mounting,
tracing or reading other processes, BPF, keyrings, clock and reboot control, entering or
making namespaces), like the container runtimes' default profiles. Everything else is
allowed: it is a deny list, so programs keep working and the kernel's answer is a plain
error, never a kill.

The filter is compiled once per daemon with libseccomp's own Python binding (the one the
libseccomp project maintains; Debian packages it as ``python3-seccomp``, which the
Makefile installs) and carried as BPF to ``seccomp_exec.py``, which loads it in the exec
chain, or to ``load`` in a fork server child. No binding, not Linux, or a kernel without
seccomp: ``unavailable`` says why and the backends report the control as ``none``
(``strict`` refuses the config, ``best-effort`` starts without the filter and says so).

A leaf module: nothing of the package is imported.
"""

from __future__ import annotations

import errno
import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

PROFILES = ("none", "default")

# Calls answered with EPERM under "default". Names this kernel or libseccomp does not
# know are left out when the filter is compiled (an old call on a new kernel, or the
# other way round). Not listed, on purpose: what setpriv needs for the privilege drop
# after the filter is loaded (setresuid, setgroups, capset, prctl).
DENIED = (
    # kernel code and the machine itself
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "iopl", "ioperm", "acct", "quotactl", "nfsservctl", "uselib", "vm86", "vm86old",
    "syslog", "lookup_dcookie", "_sysctl", "sysfs", "ustat",
    # mounts and namespaces (a container's are set up before the filter is loaded)
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "setns", "unshare",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "perf_event_open",
    "name_to_handle_at", "open_by_handle_at", "userfaultfd",
    # BPF and the kernel keyrings
    "bpf", "add_key", "request_key", "keyctl",
    # the clocks
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)  # fmt: skip

# Where Debian's python3-seccomp puts the binding, for an interpreter that does not
# have the system's dist-packages on its path (a venv or a separately built 3.11 with
# the same ABI).
_SYSTEM_DIRS = ("/usr/lib/python3/dist-packages",)


@functools.cache
def binding() -> ModuleType | None:
    """libseccomp's Python module, or ``None`` when it is not installed for this ABI."""
    try:
        return importlib.import_module("seccomp")  # installed for this interpreter
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for d in _SYSTEM_DIRS:
        path = Path(d) / f"seccomp{suffix}"
        if not path.is_file():
            continue
        loader = importlib.machinery.ExtensionFileLoader("seccomp", str(path))
        spec = importlib.util.spec_from_file_location("seccomp", path, loader=loader)
        if spec is None:
            continue
        module = importlib.util.module_from_spec(spec)
        try:
            loader.exec_module(module)
        except ImportError:
            continue  # built for another interpreter
        return module
    return None


def _kernel_has_seccomp() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


@functools.cache
def unavailable() -> str | None:
    """Why this machine cannot give workers a seccomp filter, or ``None``."""
    if not sys.platform.startswith("linux"):
        return "seccomp needs Linux"
    if not _kernel_has_seccomp():
        return "this kernel has no seccomp filters"
    if binding() is None:
        return "libseccomp's Python binding is not installed (Debian: python3-seccomp)"
    return None


@functools.cache
def program(profile: str) -> bytes:
    """The BPF program for ``profile`` ("default"), compiled once; ``OSError`` if it
    cannot be (no binding). The calls are denied on this machine's native architecture
    and, on x86-64, for 32-bit (i386, x32) system calls too, so that ``int 0x80`` is
    no way round the filter."""
    if profile != "default":
        raise ValueError(f"no seccomp profile {profile!r} (known: {', '.join(PROFILES)})")
    sc = binding()
    if sc is None:
        raise OSError(errno.ENOSYS, unavailable() or "no libseccomp binding")
    f = sc.SyscallFilter(sc.ALLOW)
    if sc.system_arch() == sc.Arch.X86_64:
        for arch in (sc.Arch.X86, sc.Arch.X32):
            try:
                f.add_arch(arch)
            except (RuntimeError, ValueError, OSError):
                pass  # a libseccomp without it: that arch stays the kernel's default
    for name in DENIED:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a system call this libseccomp or architecture knows
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def wrapper(profile: str) -> list[str]:
    """``seccomp_exec.py`` as an argv prefix that loads ``profile``'s filter."""
    loader = Path(__file__).with_name("seccomp_exec.py")
    return [sys.executable, "-I", "-S", str(loader), program(profile).hex()]


def load_self(profile: str) -> None:
    """Load ``profile``'s filter into the calling process (a fork server child)."""
    from supervisord_qnx.partition.seccomp_exec import load

    load(program(profile))
