"""Worker logs: bounded by size rotation, never a lost, torn or foreign line, not even
while the daemon is dead (docs/logging.md). Real daemons, real workers, real writers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from supervisord_qnx.supervise import logwriter
from tests.cgroup_helpers import CgroupRoot
from tests.conftest import ConfigDir, pid_alive, wait_until, worker_py
from tests.daemonproc import DaemonProc, ctl_status

pytestmark = pytest.mark.integration

PAD = "x" * 22
LINE = re.compile(rb"^(\d{9}) " + PAD.encode() + rb"$")


def flood(seconds: float) -> str:
    """A worker writing numbered lines as fast as it can for ``seconds``, then
    ``END <count>``. It writes in 4093-byte slices, so nearly every write() ends in the
    middle of a line: the writer must put lines together, not trust write boundaries."""
    return worker_py(
        "import os, time\n"
        f"end = time.monotonic() + {seconds}\n"
        "i, pending = 0, b''\n"
        "while time.monotonic() < end:\n"
        f"    block = b''.join(b'%09d {PAD}\\n' % n for n in range(i, i + 2000))\n"
        "    i += 2000\n"
        "    data = pending + block\n"
        "    cut = len(data) - len(data) % 4093\n"
        "    view = memoryview(data)\n"
        "    for s in range(0, cut, 4093):\n"
        "        os.write(1, view[s:s + 4093])\n"
        "    pending = data[cut:]\n"
        "os.write(1, pending + b'END %d\\n' % i)\n"
    )


def generations(path: Path, keep: int) -> list[Path]:
    """The rotated files of one log, oldest first."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)]
    return [p for p in [*older, path] if p.exists()]


def read_numbers(path: Path, keep: int) -> tuple[list[int], bytes]:
    """Every numbered line of the log's files in order, and the last line."""
    files = [p.read_bytes() for p in generations(path, keep)]
    # Each file on its own ends a line: a line is never torn across a rotation.
    assert all(f.endswith(b"\n") for f in files), "a file ends in the middle of a line"
    data = b"".join(files)
    lines = data.split(b"\n")[:-1]
    numbers = []
    for line in lines[:-1]:
        m = LINE.match(line)
        assert m, f"torn or foreign line: {line[:80]!r}"
        numbers.append(int(m.group(1)))
    return numbers, lines[-1]


def sample_bound(tenant_dir: Path, name: str, max_size: int, keep: int) -> list[str]:
    """What is wrong with the directory right now: a file over max_size, or a file that
    is not one of the log's keep + 1 names (and its lock)."""
    allowed = {name, f"{name}.lock", *(f"{name}.{i}" for i in range(1, keep + 1))}
    problems = []
    for entry in os.scandir(tenant_dir):
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue  # renamed between the listing and the stat
        if entry.name not in allowed:
            problems.append(f"unexpected file {entry.name}")
        elif size > max_size:
            problems.append(f"{entry.name} holds {size} bytes > {max_size}")
    return problems


def newest(path: Path) -> bytes:
    """The newest file's bytes; it is briefly absent while the writer rotates."""
    for _ in range(1000):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            time.sleep(0.001)
    raise AssertionError(f"{path} stayed absent")


def last_number(path: Path, timeout: float = 10.0) -> int:
    """The number of the newest whole line in the log's newest file (waiting for one:
    right after a rotation the new file may not hold a whole line yet)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in reversed(newest(path).split(b"\n")[:-1]):
            m = LINE.match(line)
            if m:
                return int(m.group(1))
        if time.monotonic() > deadline:
            raise AssertionError("no numbered line yet")
        time.sleep(0.01)


def status(cfg: ConfigDir) -> list[dict]:
    return ctl_status(cfg.socket)


# ------------------------------------------------------------ flood + SIGKILL


MAX_SIZE, KEEP = 256 * 1024, 3


@pytest.mark.parametrize("backend", ["portable", "cgroup1"])
def test_a_flood_stays_bounded_whole_and_in_order_through_a_daemon_sigkill(
    cfg: ConfigDir, backend: str, request: pytest.FixtureRequest
) -> None:
    cgroup_opts: dict[str, str] = {}
    if backend == "cgroup1":
        cg: CgroupRoot = request.getfixturevalue("cg")
        cgroup_opts["cgroup_root"] = cg.name
    cfg.tenant(
        "flood",
        f"""
        log = {{ max_size = "256KiB", keep = {KEEP} }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {flood(4.0)}
        """,
    )
    cfg.write(backend=backend, **cgroup_opts)
    path = cfg.worker_log("flood", "w-0")
    first = DaemonProc(cfg)
    second: DaemonProc | None = None
    pid = None
    try:
        wait_until(lambda: {w["state"] for w in status(cfg)} == {"running"}, 30, "running")
        pid = status(cfg)[0]["pid"]
        wait_until(lambda: path.with_name(path.name + ".2").exists(), 30, "two rotations")
        problems: list[str] = []
        problems += sample_bound(path.parent, path.name, MAX_SIZE, KEEP)
        before_kill = last_number(path)
        # The writer was forked by the daemon's writer server, not started on its own
        # (supervise/logserver.py): what follows is that forked writer's doing.
        (writer,) = children_writing(first.proc.pid, path.name)
        assert b"--serve" in Path(f"/proc/{writer}/cmdline").read_bytes().split(b"\0")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed_at = time.monotonic()
        # The worker floods on with nobody supervising it; its writer keeps rotating.
        samples = 0
        while b"END " not in newest(path)[-64:]:
            problems += sample_bound(path.parent, path.name, MAX_SIZE, KEEP)
            samples += 1
            assert time.monotonic() - killed_at < 60, "the worker's END line never came"
            time.sleep(0.002)
        assert not problems, problems[:5]
        numbers, last = read_numbers(path, KEEP)
        end = int(last.split()[1])
        # Contiguous from the oldest line kept to the last one written: nothing lost,
        # nothing twice, nothing out of order, before or after the kill.
        assert numbers == list(range(numbers[0], end)), "a gap, a duplicate or disorder"
        assert numbers[0] > before_kill  # the files now hold only what came after the kill
        assert samples > 10
        # Rotation dropped only whole files: what is kept fills the bound but for one file.
        kept = sum(p.stat().st_size for p in generations(path, KEEP))
        assert MAX_SIZE * KEEP <= kept <= MAX_SIZE * (KEEP + 1)
        wait_until(lambda: not pid_alive(pid), 10, "the worker to end by itself")
        if backend == "cgroup1":
            # The next daemon reaps the dead one's partitions (the cg fixture checks).
            second = DaemonProc(cfg)
            assert second.stop() == 0
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)  # the daemon reported it; it outlived the test
        for d in (first, second):
            if d is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(timeout=30)
            if d is not None and not d.log.closed:
                d.log.close()


# ------------------------------------------------------------ reading


async def test_logs_reads_across_the_rotation_boundary(cfg: ConfigDir, start_daemon) -> None:
    code = "import time\nfor i in range(500): print(f'line {i:04d}')\ntime.sleep(1000)"
    cfg.tenant(
        "chatty",
        f"""
        log = {{ max_size = "4KiB", keep = 3 }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {worker_py(code)}
        """,
    )
    d = await start_daemon()
    path = cfg.worker_log("chatty", "w-0")
    with trio.fail_after(15):
        while "line 0499" not in (path.read_text() if path.exists() else ""):
            await trio.sleep(0.02)
    newest = path.read_text().splitlines()
    assert len(newest) < 300  # so the 300 lines below must come from older files too
    (reply,) = await d.call("logs", tenant="chatty", lines=300)
    assert reply["lines"] == [f"line {i:04d}" for i in range(200, 500)]
    # Asking for more than the files hold returns what they hold, oldest first.
    (reply,) = await d.call("logs", tenant="chatty", lines=10_000)
    held = [ln for p in generations(path, 3) for ln in p.read_text().splitlines()]
    assert reply["lines"] == held and held[-1] == "line 0499"


async def test_a_run_ending_mid_line_is_not_joined_with_the_next_runs_output(
    cfg: ConfigDir, start_daemon
) -> None:
    """One writer serves every run of an instance: the daemon marks each run's end in
    the pipe, so an unfinished last line ends there."""
    code = "import os\nos.write(1, b'run %d\\nunfinished %d' % (os.getpid(), os.getpid()))\n"
    cfg.tenant(
        "flaky",
        f"""
        [restart]
        policy = "always"
        backoff_initial = 0.05
        backoff_max = 0.05
        max_restarts = 1000
        [[worker]]
        name = "w"
        command = {worker_py(code)}
        """,
    )
    d = await start_daemon()
    await d.wait_for("flaky:w-0", lambda w: w["restarts"] >= 4)
    await d.call("stop", tenant="flaky")
    lines = cfg.worker_log("flaky", "w-0").read_text().splitlines()
    runs = [ln.split()[1] for ln in lines if ln.startswith("run ")]
    assert len(runs) >= 4
    assert all(re.fullmatch(r"(run|unfinished) \d+", ln) for ln in lines), lines[:6]
    assert [f"unfinished {p}" in lines for p in runs] == [True] * len(runs)


def holds_lock_of(pid: int | str, log_name: str) -> bool:
    """Whether ``pid`` has ``log_name``'s lock file open (``w-0.log``, or ``ten/w-0.log``
    where several tenants have a ``w-0``): what a log writer does for its whole life,
    forked or started (its command line names the log only when started)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(f"/{log_name}.lock"):
                return True
        except FileNotFoundError:
            continue
    return False


def children_writing(parent: int | str, log_name: str) -> list[int]:
    """Log writer processes among ``parent``'s children that write ``log_name``."""
    pids = []
    for tid in os.listdir(f"/proc/{parent}/task"):
        for pid in Path(f"/proc/{parent}/task/{tid}/children").read_text().split():
            if holds_lock_of(pid, log_name):
                pids.append(int(pid))
    return pids


def writers_for(log_name: str) -> list[int]:
    """Log writer processes (children of this process: the daemon runs in it) that
    write ``log_name``."""
    return children_writing("self", log_name)


async def test_a_dead_writer_server_is_replaced_and_its_writers_write_on(
    cfg: ConfigDir, start_daemon
) -> None:
    """Writers are forked by one pre-started server; its death costs the writers it
    forked nothing (they never talk to it again), and the next start gets a new one."""
    ticker = worker_py(
        "import time\ni = 0\nwhile True:\n    print(f'{i:09d} ' + 'x' * 22)\n"
        "    i += 1\n    time.sleep(0.01)\n"
    )
    cfg.tenant("ticks", f'[[worker]]\nname = "w"\ncommand = {ticker}\n')
    hello = worker_py("import time\nprint('hello')\ntime.sleep(1000)")
    cfg.tenant("later", f'autostart = false\n[[worker]]\nname = "w"\ncommand = {hello}\n')
    d = await start_daemon()
    sup = d.daemon.supervisor
    path = cfg.worker_log("ticks", "w-0")
    await d.wait_for("ticks:w-0", lambda w: w["state"] == "running")
    with trio.fail_after(15):
        while not path.exists() or LINE.match(path.read_bytes().split(b"\n")[0] or b"") is None:
            await trio.sleep(0.02)
    servers = sup.launchers.log_writers
    with trio.fail_after(15):
        # Every server up (they start in the background, and under load the second may
        # still be starting): one started after the kill below would look like a survivor.
        while len(servers.pids) < servers.SERVERS:
            await trio.sleep(0.02)
    old = servers.pids
    (writer,) = writers_for(f"ticks/{path.name}")
    assert b"--serve" in Path(f"/proc/{writer}/cmdline").read_bytes().split(b"\0")
    for pid in old:  # every server: the next start must start a new one
        os.kill(pid, signal.SIGKILL)
    with trio.fail_after(10):
        while any(pid_alive(p) for p in old) or sup.launchers.log_writers.pids:
            await trio.sleep(0.02)  # reaped by the daemon, not left a zombie
    seen = last_number(path)
    with trio.fail_after(15):
        while last_number(path) < seen + 20:  # the ticker's writer writes on
            await trio.sleep(0.02)
    assert writers_for(f"ticks/{path.name}") == [writer]
    await d.call("start", tenant="later", wait=True)
    later = cfg.worker_log("later", "w-0")
    with trio.fail_after(15):
        while b"hello\n" not in (later.read_bytes() if later.exists() else b""):
            await trio.sleep(0.02)
    new = sup.launchers.log_writers.pids
    assert new and not set(new) & set(old)
    (later_writer,) = writers_for(f"later/{later.name}")
    assert b"--serve" in Path(f"/proc/{later_writer}/cmdline").read_bytes().split(b"\0")
    await d.call("stop", tenant="ticks")
    numbers, _ = read_numbers(path, 5)
    assert numbers == list(range(numbers[-1] + 1)), "a line lost, doubled or out of order"


async def test_one_writer_serves_an_instance_until_it_stops(cfg: ConfigDir, start_daemon) -> None:
    worker = f"w{os.getpid()}x{time.monotonic_ns()}"  # a log name no other test uses
    cfg.tenant(
        "steady",
        f"""
        restart = {{ policy = "always", backoff_initial = 0.05, backoff_max = 0.05 }}
        [[worker]]
        name = "{worker}"
        command = {worker_py("print('hello')")}
        """,
    )
    d = await start_daemon()
    # A spawn's child holds a copy of the daemon's descriptors (the log's lock file among
    # them) until it execs: a restart in flight can show as a second holder for that
    # moment. The writer is the holder that stays.
    await d.wait_for(f"steady:{worker}-0", lambda w: w["restarts"] >= 1)
    with trio.fail_after(5):
        while len(held := writers_for(f"{worker}-0.log")) != 1:
            await trio.sleep(0.01)
    await d.wait_for(f"steady:{worker}-0", lambda w: w["restarts"] >= 3)
    # Two more restarts, still that one writer (no interpreter started per run).
    with trio.fail_after(5):
        while writers_for(f"{worker}-0.log") != held:
            await trio.sleep(0.01)
    await d.call("stop", tenant="steady")
    # Stopped: the daemon let go of the pipe and the writer ended.
    with trio.fail_after(10):
        while writers_for(f"{worker}-0.log"):
            await trio.sleep(0.02)
    assert cfg.worker_log("steady", f"{worker}-0").read_text().count("hello\n") >= 3


async def test_an_exit_is_reported_once_the_runs_last_lines_are_in_its_files(
    cfg: ConfigDir, start_daemon
) -> None:
    # A slow writer: every rotation of 4 KiB files renames 1000 files, so the last
    # 64 KiB in the pipe take it a while after the worker has ended.
    code = "import sys\nsys.stdout.write(('x' * 99 + '\\n') * 4000 + 'last words\\n')\n"
    log = cfg.worker_log("burst", "w-0")
    log.parent.mkdir(parents=True)
    for i in range(1, 1001):
        log.with_name(f"{log.name}.{i}").write_bytes(b"old\n")
    cfg.tenant(
        "burst",
        f"""
        log = {{ max_size = "4KiB", keep = 1000 }}
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {worker_py(code)}
        """,
    )
    d = await start_daemon()
    await d.wait_for("burst:w-0", lambda w: w["state"] == "exited", timeout=30)
    # The file itself, at once (`logs` would also wait for a batch being written).
    assert newest(log).endswith(b"\nlast words\n")
    (reply,) = await d.call("logs", tenant="burst", lines=1)
    assert reply["lines"] == ["last words"]


async def test_tenants_whose_joined_names_collide_get_their_own_logs(
    cfg: ConfigDir, start_daemon
) -> None:
    # `a.b` + `c` and `a` + `b.c` both used to write a.b.c-0.log.
    for tenant_name, worker in (("a.b", "c"), ("a", "b.c")):
        code = f"import time\nprint('I am {tenant_name}/{worker}', flush=True)\ntime.sleep(1000)"
        cfg.tenant(
            tenant_name,
            f"""
            [[worker]]
            name = "{worker}"
            command = {worker_py(code)}
            """,
        )
    d = await start_daemon()
    one, two = cfg.worker_log("a.b", "c-0"), cfg.worker_log("a", "b.c-0")
    assert one != two
    with trio.fail_after(15):
        for tenant_name, worker in (("a.b", "c"), ("a", "b.c")):
            while True:
                (reply,) = await d.call("logs", tenant=tenant_name)
                if reply["lines"]:
                    break
                await trio.sleep(0.02)
            assert reply["lines"] == [f"I am {tenant_name}/{worker}"]
    assert one.read_text() == "I am a.b/c\n"
    assert two.read_text() == "I am a/b.c\n"


async def test_log_settings_worker_over_tenant_over_daemon(cfg: ConfigDir, start_daemon) -> None:
    """keep: the daemon says 4, the tenant 2, one worker 1; max_size from the tenant."""
    cfg.daemon_extra = 'log = { max_size = "1MiB", keep = 4 }\n'
    lines = worker_py("import time\nfor i in range(3000): print(f'{i:09d}')\ntime.sleep(1000)")
    cfg.tenant(
        "layered",
        f"""
        log = {{ max_size = "4KiB", keep = 2 }}
        [[worker]]
        name = "inherits"
        command = {lines}
        [[worker]]
        name = "own"
        log = {{ keep = 1 }}
        command = {lines}
        """,
    )
    cfg.tenant("plain", f"[[worker]]\nname = 'w'\ncommand = {lines}\n")
    await start_daemon()
    want = {
        cfg.worker_log("layered", "inherits-0"): (4096, 2),
        cfg.worker_log("layered", "own-0"): (4096, 1),
        cfg.worker_log("plain", "w-0"): (1 << 20, 4),
    }

    def ends_with_last_line(path: Path) -> bool:
        # A rotation renames the file and creates it anew: briefly, it is not there.
        try:
            return path.read_text().endswith("000002999\n")
        except FileNotFoundError:
            return False

    with trio.fail_after(15):
        for path in want:
            while not ends_with_last_line(path):
                await trio.sleep(0.02)
    for path, (max_size, keep) in want.items():
        names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))
        if max_size == 4096:  # 30 KB of lines: every allowed generation is in use
            assert names == sorted(
                [path.name, f"{path.name}.lock", *(f"{path.name}.{i}" for i in range(1, keep + 1))]
            )
            assert all(p.stat().st_size <= max_size for p in generations(path, keep))
        else:
            assert names == [path.name, f"{path.name}.lock"]


# ------------------------------------------------------------ symlinks


async def test_a_symlink_planted_at_a_log_path_is_refused_and_its_target_unchanged(
    cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0\n")
    cfg.tenant(
        "victim",
        f"""
        autostart = false
        restart = {{ policy = "never" }}
        [[worker]]
        name = "w"
        command = {worker_py("print('toor::0:0:pwned:/root:/bin/sh')")}
        """,
    )
    d = await start_daemon()
    path = cfg.worker_log("victim", "w-0")
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    (w,) = await d.call("start", tenant="victim", wait=True)
    assert w["state"] == "fatal", w
    assert "symbolic link" in w["exit_reason"]
    assert target.read_text() == "root:x:0:0\n"
    assert path.is_symlink()


async def test_a_symlink_planted_for_a_tenant_log_directory_is_refused(
    cfg: ConfigDir, start_daemon, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "etc-logrotate.d"
    elsewhere.mkdir()
    cfg.tenant(
        "redirected",
        f"""
        autostart = false
        [[worker]]
        name = "w"
        command = {worker_py("print('payload')")}
        """,
    )
    d = await start_daemon()
    tenant_dir = cfg.worker_log("redirected", "w-0").parent
    tenant_dir.parent.mkdir(parents=True, exist_ok=True)
    tenant_dir.symlink_to(elsewhere, target_is_directory=True)
    (w,) = await d.call("start", tenant="redirected", wait=True)
    assert w["state"] == "fatal", w
    assert "is not a directory" in w["exit_reason"]
    assert list(elsewhere.iterdir()) == []


def test_the_writer_refuses_a_symlink_planted_mid_run(tmp_path: Path) -> None:
    """Planted between two appends (as another writer's rotation could leave the name
    free): the writer stops rather than follow it; the worker would see EPIPE."""
    logs = tmp_path / "logs"
    logs.mkdir()
    target = tmp_path / "target"
    target.write_text("precious\n")
    writer, pipe = start_writer(logs, "w-0.log", 4096, 2)
    try:
        os.write(pipe, b"first\n")
        first = logs / "w-0.log"
        wait_until(lambda: first.exists() and first.read_bytes() == b"first\n", 10, "a line")
        (logs / "w-0.log").rename(logs / "moved")
        (logs / "w-0.log").symlink_to(target)
        os.write(pipe, b"second\n")
        assert writer.wait(10) == logwriter.EXIT_REFUSED
    finally:
        os.close(pipe)
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    assert target.read_text() == "precious\n"
    assert (logs / "moved").read_bytes() == b"first\n"


# ------------------------------------------------------------ the writer alone


def start_writer(
    directory: Path, name: str, max_size: int, keep: int
) -> tuple[subprocess.Popen[bytes], int]:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    read_end, write_end = os.pipe()
    try:
        args = [str(dir_fd), name, str(max_size), str(keep)]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", logwriter.__file__, *args],
            stdin=read_end,
            pass_fds=(dir_fd,),
        )
    finally:
        os.close(read_end)
        os.close(dir_fd)
    return proc, write_end


def test_long_lines_are_cut_into_marked_pieces_and_a_last_line_is_ended(tmp_path: Path) -> None:
    writer, pipe = start_writer(tmp_path, "w.log", 8192, 5)
    os.write(pipe, b"short\n" + b"L" * 20000 + b"\nafter\nno newline at the end")
    os.close(pipe)
    assert writer.wait(10) == 0
    data = b"".join(p.read_bytes() for p in generations(tmp_path / "w.log", 5))
    lines = data.split(b"\n")
    assert lines[0] == b"short" and lines[-1] == b""
    marker = logwriter.CONTINUES.rstrip(b"\n")
    pieces = lines[1:-3]
    assert len(pieces) == 3
    assert all(p.endswith(marker) and len(p) + 1 == 8192 for p in pieces[:-1])
    assert b"".join(p.removesuffix(marker) for p in pieces) == b"L" * 20000
    assert lines[-3:-1] == [b"after", b"no newline at the end"]
    assert all(p.stat().st_size <= 8192 for p in tmp_path.glob("w.log*"))


def test_writers_sharing_one_log_keep_the_bound_and_whole_lines(tmp_path: Path) -> None:
    """A restarted worker's writer meets the previous run's, still draining (or kept by
    a worker adopted after a daemon restart): they share the log through its lock."""
    # Small files: rotations come every few hundred lines, so each writer often finds
    # the log rotated by another since its last append.
    n, count, max_size, keep = 4, 20000, 4096, 3
    runs = [start_writer(tmp_path, "w.log", max_size, keep) for _ in range(n)]
    data = [b"".join(b"%d:%06d\n" % (k, i) for i in range(count)) for k in range(n)]
    problems: list[str] = []
    # Odd-sized writes that cut lines in the middle, alternating between the writers.
    for s in range(0, len(data[0]), 1000):
        for k, (_, pipe) in enumerate(runs):
            os.write(pipe, data[k][s : s + 1000])
        problems += sample_bound(tmp_path, "w.log", max_size, keep)
    for proc, pipe in runs:
        os.close(pipe)
        assert proc.wait(10) == 0
    problems += sample_bound(tmp_path, "w.log", max_size, keep)
    assert not problems, problems[:5]
    files = [p.read_bytes() for p in generations(tmp_path / "w.log", keep)]
    assert len(files) == keep + 1 and all(f.endswith(b"\n") for f in files)
    lines = b"".join(files).split(b"\n")[:-1]
    assert all(re.fullmatch(rb"[0-3]:\d{6}", ln) for ln in lines)
    for k in range(n):
        mine = [int(ln[2:]) for ln in lines if ln.startswith(b"%d:" % k)]
        # Rotation drops whole old files, so a writer's lines kept are its last ones,
        # in order, with no gap.
        assert mine == list(range(mine[0], count) if mine else [])


def test_a_writer_appends_to_the_current_file_after_another_rotated_its_own(
    tmp_path: Path,
) -> None:
    """The previous run's writer (a worker adopted after a daemon restart, or a
    grandchild still writing) has been quiet while the new run's writer rotated its
    file away and out: its next lines must land in the current file, not in the
    deleted one its descriptor still points to."""
    log = tmp_path / "w.log"
    old, old_pipe = start_writer(tmp_path, "w.log", 4096, 1)
    new, new_pipe = start_writer(tmp_path, "w.log", 4096, 1)
    try:
        os.write(old_pipe, b"old 1\n")
        wait_until(lambda: log.exists() and log.read_bytes() == b"old 1\n", 10, "old 1")
        # Three files' worth: the old writer's file is rotated to .1, then deleted.
        os.write(new_pipe, b"".join(b"new %06d\n" % i for i in range(3 * 4096 // 11)))
        wait_until(lambda: newest(log).endswith(b"new 001116\n"), 10, "the new lines")
        os.write(old_pipe, b"old 2\n")
    finally:
        os.close(old_pipe)
        os.close(new_pipe)
    assert old.wait(10) == 0 and new.wait(10) == 0
    assert newest(log).endswith(b"new 001116\nold 2\n")


# ------------------------------------------------------------ configuration


def test_log_keys_are_validated_and_located(cfg: ConfigDir) -> None:
    from supervisord_qnx.config.load import ConfigError, load

    cfg.daemon_extra = "log = { keep = 2 }\n"
    cfg.tenant(
        "bad",
        """
        log = { max_size = "1KiB" }
        [[worker]]
        name = "w"
        log = { kep = 3 }
        command = ["true"]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load(cfg.write())
    text = str(info.value)
    assert "bad.toml: log.max_size:" in text and "4096" in text
    assert "bad.toml: worker[0].log.kep:" in text
    # The daemon's table alone is complete: a key left out keeps the built-in default.
    cfg.tenant("bad", '[[worker]]\nname = "w"\ncommand = ["true"]\n')
    daemon = load(cfg.write()).daemon
    assert (daemon.log.max_size, daemon.log.keep) == (10 << 20, 2)
    cfg.daemon_extra = 'log = { max_size = "2MiB" }\n'
    daemon = load(cfg.write()).daemon
    assert (daemon.log.max_size, daemon.log.keep) == (2 << 20, 5)


def test_a_writer_that_stopped_reading_never_holds_the_run_end_thread(tmp_path: Path) -> None:
    """A writer stuck on a full disk leaves the pipe full. The run-end mark must not then
    block its thread forever (each exit of a crash-looping worker would strand one), and
    the threads that do wait are the log's own few, not the pool spawns run in."""
    import threading

    from supervisord_qnx.supervise import logpipe

    read_end, write_end = os.pipe()
    lock = os.open(tmp_path, os.O_RDONLY)
    try:
        os.set_blocking(write_end, False)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(write_end, b"x" * 4096)
        os.set_blocking(write_end, True)
        done = threading.Event()

        def end() -> None:
            logpipe._end_run(write_end, lock, 0.2)
            done.set()

        threading.Thread(target=end, daemon=True).start()
        assert done.wait(5), "the run-end mark blocked on a full pipe"
    finally:
        os.close(read_end)  # unblocks a stuck write (EPIPE) so the thread can end
        os.close(write_end)
        os.close(lock)
