"""What the daemon imports before its first spawn is start-up time and resident memory
every operator pays (issue 14). Libraries that only some requests need are imported by
those requests: here, prometheus_client, at the first ``metrics`` call or textfile write
(tests/test_metrics.py checks that the metrics themselves are whole)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ConfigDir
from tests.test_cli import DaemonProc, beat_tenant, ctl, daemon  # noqa: F401 - the fixture


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter of this environment (what it imports is its own)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )


def _after_startup(cfg: ConfigDir) -> str:
    """Snippet: the daemon's start-up on ``cfg`` (``main``: configuration validated,
    tenants admitted; ``rc`` its exit code), then the daemon and its control methods
    imported, as a running daemon has them."""
    return (
        "import sys\n"
        "from supervisord_qnx.cli import daemon\n"
        f"rc = daemon.main(['--config', {str(cfg.path)!r}, '--check'])\n"
        "from supervisord_qnx import daemon as d\n"
        "from supervisord_qnx.control import methods\n"
    )


def test_the_daemon_does_not_import_prometheus_client_before_it_renders_metrics() -> None:
    code = (
        "import sys\n"
        "from supervisord_qnx import daemon\n"
        "from supervisord_qnx.control import methods, metrics\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = _python(code)
    assert out.stdout.strip() == "False", out


def test_a_running_daemon_has_not_loaded_openssl_asyncio_or_hashlib(
    cfg: ConfigDir,
    daemon: Callable[[], DaemonProc],  # noqa: F811 - the fixture imported above
) -> None:
    """trio imports ssl and hmac, structlog asyncio, pydantic secrets; the daemon uses none
    of them (supervisord_qnx/lazymod.py) and makes its own digests without hashlib
    (supervisord_qnx/digest.py): OpenSSL's libraries are never mapped into it."""
    beat_tenant(cfg, "alpha")
    cfg.write()
    d = daemon()
    # Running its worker, its state written (a digest) and a status call answered; then
    # a restart (a stop, an exit, a spawn from the worker threads) and the events.
    assert ctl_status_running(cfg.socket) == {"alpha:beat-0"}
    ctl(cfg.socket, "restart", "alpha", check=True)
    assert ctl_status_running(cfg.socket) == {"alpha:beat-0"}
    ctl(cfg.socket, "events", check=True)
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libcrypto" not in maps and "libssl" not in maps, maps
    assert "_asyncio" not in maps and "_hashlib" not in maps, maps
    # shutil's archive formats (bz2, lzma) are deferred too: their libraries stay out.
    assert "libbz2" not in maps and "liblzma" not in maps, maps


def ctl_status_running(sock: Path) -> set[str]:
    # Exit status 3 says some worker is not running (yet): the answer is as good.
    proc = ctl(sock, "--json", "status")
    assert proc.returncode in (0, 3), (proc.returncode, proc.stdout, proc.stderr)
    return {w["name"] for w in json.loads(proc.stdout) if w["state"] == "running"}


def test_a_deferred_module_is_the_real_one_once_used() -> None:
    """A stand-in loads the real module at its first attribute read, for the code that
    imported it before (its reference) and after (``sys.modules``); a package's
    submodules import through it."""
    code = (
        "import sys\n"
        "from supervisord_qnx.lazymod import defer\n"
        "print(defer('asyncio', 'hmac'))\n"
        "import asyncio, hmac\n"
        "early = asyncio\n"
        "print('_asyncio' in sys.modules, type(sys.modules['asyncio']).__name__)\n"
        "import asyncio.events\n"
        # One copy of the submodule: the one the real package imported for itself.
        "assert asyncio.events.AbstractEventLoop is early.AbstractEventLoop\n"
        "assert sys.modules['asyncio.events'] is sys.modules['asyncio'].events\n"
        "async def answer():\n"
        "    return 42\n"
        "print(early.run(answer()), type(sys.modules['asyncio']).__name__)\n"
        "import asyncio as later\n"
        "print(later.run(answer()), later.Queue is early.Queue)\n"
        "print(hmac.new(b'k', b'm', 'sha256').hexdigest()[:8])\n"
    )
    out = _python(code)
    assert out.stdout.splitlines() == [
        "['asyncio', 'hmac']",
        "False _Deferred",
        "42 module",
        "42 True",
        "b60090e3",
    ], out


def test_the_daemons_digests_are_sha256() -> None:
    import hashlib

    from supervisord_qnx.digest import sha256_hex

    for data in (b"", b"state", bytes(range(256)) * 40):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_the_daemon_builds_its_models_without_loading_importlib_metadata(cfg: ConfigDir) -> None:
    """pydantic's plugin lookup at the first model would load ``importlib.metadata`` (and
    with it email, zipfile, csv: 1.2 MiB of the daemon's RSS); the daemon's start-up
    (``main``: its configuration validated, the tenants admitted) leaves it unloaded,
    and the configuration still validates (a bad value is still refused)."""
    beat_tenant(cfg, "alpha")
    cfg.write()
    code = _after_startup(cfg) + (
        "print(rc, type(sys.modules['importlib.metadata']).__name__,"
        " sorted({'email', 'zipfile', 'csv'} & set(sys.modules)))\n"
    )
    out = _python(code)
    assert out.stdout.splitlines()[-1] == "0 _Deferred []", out
    cfg.tenant("alpha", '[[worker]]\nname = "beat"\ncommand = ["true"]\nstop_timeout = "soon"\n')
    out = _python(code)
    assert not out.stdout.splitlines()[-1].startswith("0 "), out  # refused, as before


def test_a_function_taken_from_a_deferred_module_loads_it_when_called() -> None:
    """``from importlib.metadata import entry_points`` (pydantic's plugin loader) binds a
    forwarder; its first call loads the real module and answers as the real one does."""
    code = (
        "import sys\n"
        "from supervisord_qnx.lazymod import defer\n"
        "print(defer('importlib.metadata'))\n"
        "from importlib.metadata import entry_points, version\n"
        "print(type(sys.modules['importlib.metadata']).__name__)\n"
        "print(version('trio') == sys.modules['trio'].__version__ if 'trio' in sys.modules"
        " else version('trio').count('.') >= 1)\n"
        "print(type(sys.modules['importlib.metadata']).__name__)\n"
        "import importlib.metadata as m\n"
        "print(any(e.name == 'supervisord-qnx' for e in entry_points(group='console_scripts')),"
        " m.entry_points is not entry_points, m.PackageNotFoundError.__name__)\n"
    )
    out = _python(code)
    assert out.stdout.splitlines() == [
        "['importlib.metadata']",
        "_Deferred",
        "True",
        "module",
        "True True PackageNotFoundError",
    ], out


def test_deferred_compression_modules_still_work_for_shutil() -> None:
    """bz2 and lzma stand in until used (lazymod.DAEMON_DEFERRED): shutil, imported after
    them, still offers its bz2 and xz archive formats, and both modules work once used."""
    code = (
        "import sys\n"
        "from supervisord_qnx.lazymod import DAEMON_DEFERRED, defer\n"
        "defer(*DAEMON_DEFERRED)\n"
        "import shutil\n"
        "print(type(sys.modules['bz2']).__name__, type(sys.modules['lzma']).__name__)\n"
        "print(sorted(f for f, _ in shutil.get_archive_formats()))\n"
        "import bz2, lzma\n"
        "data = b'x' * 1000\n"
        "print(bz2.decompress(bz2.compress(data)) == data,"
        " lzma.decompress(lzma.compress(data)) == data)\n"
    )
    out = _python(code)
    assert out.stdout.splitlines() == [
        "_Deferred _Deferred",
        "['bztar', 'gztar', 'tar', 'xztar', 'zip']",
        "True True",
    ], out


def test_the_whole_configs_validator_is_never_built_by_load_or_reload(cfg: ConfigDir) -> None:
    """``load`` constructs ``Config`` from parts it has validated (its validator, which
    spans every model, would be 0.3 MiB of the daemon's RSS). The daemon's uses of it, a
    reload's comparison and copies included, do not build it; a ``Config(...)`` made
    elsewhere is still validated."""
    beat_tenant(cfg, "alpha")
    cfg.write()
    code = (
        "import sys\n"
        "from supervisord_qnx.config.load import load\n"
        "from supervisord_qnx.config.model import Config\n"
        "from supervisord_qnx.config.diff import diff, keep_start_settings\n"
        "from supervisord_qnx import daemon as d\n"
        f"live = load({str(cfg.path)!r})\n"
        "backend = d.make_backend(live, 'portable')\n"
        "tree, _ = d.admit(live, backend)\n"
        "d.Daemon(live, backend, tree, [])\n"
        f"new = load({str(cfg.path)!r})\n"
        "plan = diff(live, live.tree, new, new.tree)\n"
        "new.model_copy(update={'daemon': keep_start_settings(live.daemon, new.daemon)})\n"
        "live.model_copy(update={'tree': new.tree})\n"
        "print(live.tenants[0].name, Config.__pydantic_complete__)\n"
        "try:\n"
        "    Config(**{**dict(live), 'tenant_files': 'not a mapping'})\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, Config.__pydantic_complete__)\n"
    )
    out = _python(code)
    assert out.stdout.splitlines() == ["alpha False", "ValidationError True"], out


def _backend_modules(name: str) -> str:
    """In a fresh interpreter: the backend ``choose_backend`` gives for ``name``, and
    which cgroup backend modules that made it import."""
    from tests.cgroup_helpers import unique_instance

    code = (
        "import sys\n"
        "from supervisord_qnx.partition.detect import choose_backend\n"
        f"b = choose_backend({name!r}, cgroup_root=None, instance={unique_instance('imp')!r})\n"
        "print(b.name, sorted(m.rpartition('.')[2] for m in sys.modules"
        " if m.startswith('supervisord_qnx.partition.cgroup_v')))\n"
        "b.close()\n"
    )
    out = _python(code)
    return out.stdout.strip()


def test_a_daemon_imports_only_the_backend_it_runs() -> None:
    """``choose_backend`` imports a backend when it tries it (issue 14: a portable daemon
    holds neither cgroup backend's code, a cgroup v1 daemon not the v2 one's)."""
    assert _backend_modules("portable") == "portable []"
    from tests.cgroup_helpers import require_cgroup1

    require_cgroup1()
    assert _backend_modules("cgroup1") == "cgroup1 ['cgroup_v1']"


def test_the_daemon_starts_without_idna_which_still_works_once_used(cfg: ConfigDir) -> None:
    """trio imports idna for host names it resolves; the daemon resolves none, so after
    its start-up (``main``: configuration validated, tenants admitted, the daemon and its
    control methods imported) idna is still the stand-in. Used, it is the real one."""
    beat_tenant(cfg, "alpha")
    cfg.write()
    code = _after_startup(cfg) + (
        "import trio\n"
        "print(rc, type(sys.modules['idna']).__name__)\n"
        "import idna\n"
        "print(idna.encode('b\\u00fccher.example', uts46=True).decode(),"
        " type(sys.modules['idna']).__name__)\n"
    )
    out = _python(code)
    assert out.stdout.splitlines()[-2:] == [
        "0 _Deferred",
        "xn--bcher-kva.example module",
    ], out
