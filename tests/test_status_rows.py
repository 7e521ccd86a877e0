"""``status`` from its packed, reused rows (control/statusrows.py), through the real daemon
on the portable backend: what a client decodes is what ``Supervisor.status`` says, and a
change of any shown value is in the very next answer."""

from __future__ import annotations

import os
import signal
from typing import Any

import msgpack
import pytest

from supervisord_qnx.control.report import with_sched
from supervisord_qnx.control.rpc import ErrorCode, Packed, RpcError, encode_response, pack_value
from tests.conftest import ConfigDir, pid_alive, worker_py
from tests.test_daemon_notify import SEND

pytestmark = pytest.mark.integration

SLEEP = worker_py("import time\ntime.sleep(600)\n")
# Says STATUS=<contents of the file> whenever the file changes: a shown value that
# changes with no change of state.
# READY=1 once the test creates "go" (until then it is a live row that is not running).
SAYS = worker_py(
    SEND + "import sys\nlast = None\nwait_for(sys.argv[1] + '/go')\nsend('READY=1')\n"
    "while True:\n"
    "    try: text = open(sys.argv[1] + '/said').read()\n"
    "    except OSError: text = None\n"
    "    if text and text != last: send('STATUS=' + text); last = text\n"
    "    time.sleep(0.02)\n"
)


def tenants(cfg: ConfigDir) -> None:
    cfg.tenant(
        "calm",
        f"""
        restart = {{ policy = "always", backoff_initial = 0.05 }}
        sched = {{ policy = "batch", nice = 5 }}
        [[worker]]
        name = "w"
        command = {SLEEP}
        instances = 3
        """,
    )
    cfg.tenant(
        "talky",
        f"""
        autostart = false
        restart = {{ policy = "always" }}
        [[worker]]
        name = "n"
        command = {SAYS[:-1]}, "{cfg.root}"]
        ready = "notify"
        """,
    )


async def talky_running(cfg: ConfigDir, start_daemon: Any) -> Any:
    """A daemon on ``tenants``, its notify worker told to go and running."""
    tenants(cfg)
    d = await start_daemon()
    await d.call("start", tenant="talky")
    (cfg.root / "go").touch()
    await d.wait_for("talky:n-0", lambda w: w["state"] == "running")
    return d


def without_uptime(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "uptime"} for r in rows]


def test_a_packed_result_is_the_same_message_as_the_value() -> None:
    value = [{"state": "running", "pid": 7, "uptime": 1.5, "sched": None}]
    assert encode_response(9, Packed(pack_value(value))) == encode_response(9, value)


async def test_rows_are_what_the_supervisor_says_field_for_field(
    cfg: ConfigDir, start_daemon
) -> None:
    tenants(cfg)
    d = await start_daemon()
    await d.call("start", tenant="talky")  # starting until "go": it has a pid and a sched
    await d.wait_for("talky:n-0", lambda w: w["pid"] is not None)
    await d.call("stop", tenant="calm")  # stopped rows beside running ones
    await d.call("start", tenant="calm", wait=True)
    # A run is `running` from its spawn; its nice and policy are applied just before its
    # first instruction, one after the other: wait until the kernel shows both.
    for i in range(3):
        await d.wait_for(f"calm:w-{i}", lambda w: w["sched"]["policy"] == "batch")
    await d.call("run", partition="tenants", command=["sleep", "60"])  # a job's row too
    for _ in range(2):  # the second answer comes from the reused rows
        got = await d.call("status")
        sup = d.daemon.supervisor
        expected = sup.status() + d.daemon.jobs.status()
        await with_sched(expected, d.daemon.blocking)
        # Same rows, same fields in the same order, same values (uptime moves on).
        assert [list(r) for r in got] == [list(r) for r in expected]
        assert without_uptime(got) == without_uptime(expected)
        for g, e in zip(got, expected, strict=True):
            if e["uptime"] is None:
                assert g["uptime"] is None
            else:
                assert 0 <= e["uptime"] - g["uptime"] < 5
        assert [r["state"] for r in got] == ["running"] * 3 + ["starting", "running"]
        assert all(r["sched"] is not None for r in got)
        assert [(r["sched"]["policy"], r["sched"]["nice"]) for r in got] == [("batch", 5)] * 3 + [
            ("other", 0)
        ] * 2
        one = await d.call("status", tenant="calm")
        assert without_uptime(one) == without_uptime(got[:3])


async def test_a_change_is_in_the_very_next_answer(cfg: ConfigDir, start_daemon) -> None:
    d = await talky_running(cfg, start_daemon)
    before = {w["name"]: w for w in await d.call("status")}
    assert before["calm:w-1"]["state"] == "running"

    # Stopped: state, pid, exit reason and sched change together, answered at once.
    await d.call("stop", tenant="calm", wait=True)
    after = {w["name"]: w for w in await d.call("status")}
    for i in range(3):
        w = after[f"calm:w-{i}"]
        assert (w["state"], w["pid"], w["uptime"], w["sched"]) == ("stopped", None, None, None)
        assert w["exit_reason"] is not None

    await d.call("start", tenant="calm", wait=True)
    again = {w["name"]: w for w in await d.call("status")}
    pid = again["calm:w-1"]["pid"]
    assert again["calm:w-1"]["state"] == "running" and pid != before["calm:w-1"]["pid"]
    assert again["calm:w-1"]["restarts"] == 0

    # Killed behind the daemon's back: the restart shows a new pid and one more restart,
    # with nothing in between for a cache to notice but the values themselves.
    os.kill(pid, signal.SIGKILL)
    w = await d.wait_for("calm:w-1", lambda w: w["pid"] not in (None, pid))
    assert w["restarts"] == 1 and w["exit_reason"] == "signal:SIGKILL"
    assert not pid_alive(pid)

    # A value that changes while the state stays: the worker's sd_notify STATUS=.
    for text in ("one", "two"):
        (cfg.root / "said").write_text(text)
        w = await d.wait_for("talky:n-0", lambda w, t=text: w["status_text"] == t)
        assert w["state"] == "running"


async def test_sched_read_in_steps_says_the_same(
    cfg: ConfigDir, start_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many live pids are read SCHED_STEP at a time, the loop running between: same answer.
    from supervisord_qnx.control import statusrows

    d = await talky_running(cfg, start_daemon)
    inline = await d.call("status")
    monkeypatch.setattr(statusrows, "SCHED_STEP", 1)
    pooled = await d.call("status")
    assert without_uptime(pooled) == without_uptime(inline)
    assert msgpack.packb(without_uptime(pooled)) == msgpack.packb(without_uptime(inline))


async def test_fields_picks_a_compact_form_and_refuses_unknown_names(
    cfg: ConfigDir, start_daemon
) -> None:
    d = await talky_running(cfg, start_daemon)
    await d.call("run", partition="tenants", command=["sleep", "60"])
    full = await d.call("status")
    # Every field a row can carry can be asked for (a new field must be added there too).
    from supervisord_qnx.control.statusrows import ROW_FIELDS

    assert {k for r in full for k in r} <= ROW_FIELDS

    small = await d.call("status", fields=["state", "name", "memory_denied", "state"])
    assert [list(r) for r in small] == [["state", "name"]] * len(full)
    assert small == [{"state": r["state"], "name": r["name"]} for r in full]
    with_sched = await d.call("status", tenant="calm", fields=["pid", "sched"])
    assert with_sched == [{"pid": r["pid"], "sched": r["sched"]} for r in full[:3]]
    jobs = await d.call("status", tenant="job", fields=["job", "state"])
    assert jobs == [{"job": 1, "state": "running"}]
    # Only fields an instance holds itself: read alone, and the same as in the full rows,
    # for the workers and for the job (in the order asked, uptime as a running one has).
    from supervisord_qnx.supervise.supervisor import OWN_FIELDS

    own = list(reversed(OWN_FIELDS))
    alone = await d.call("status", fields=own)
    assert [list(r) for r in alone] == [[f for f in own if f in r] for r in full]
    assert without_uptime(alone) == without_uptime([{f: r[f] for f in own if f in r} for r in full])
    assert [r["uptime"] is None for r in alone] == [r["uptime"] is None for r in full]
    assert alone[0]["uptime"] >= full[0]["uptime"]

    for bad in (["stat"], [], [7]):
        with pytest.raises(RpcError) as err:
            await d.call("status", fields=bad)
        assert err.value.code == ErrorCode.BAD_REQUEST
        assert "fields" in err.value.message


async def test_the_table_form_holds_the_same_rows_as_the_maps(cfg: ConfigDir, start_daemon) -> None:
    from supervisord_qnx.control.client import table_rows
    from supervisord_qnx.control.statusrows import ROW_FIELDS, TABLE_COLUMNS

    d = await talky_running(cfg, start_daemon)
    for i in range(3):
        await d.wait_for(f"calm:w-{i}", lambda w: (w["sched"] or {}).get("policy") == "batch")
    await d.call("run", partition="tenants", command=["sleep", "60"])  # a job's row too
    await d.call("stop", tenant="calm", wait=True)
    await d.call("start", tenant="calm", wait=True)
    for i in range(3):
        await d.wait_for(f"calm:w-{i}", lambda w: (w["sched"] or {}).get("policy") == "batch")
    for _ in range(2):  # the second answer comes from the reused rows
        maps = await d.call("status")
        table = await d.call("status", table=True)
        assert list(table) == ["columns", "rows", "sched"]
        assert table["columns"] == list(TABLE_COLUMNS) and set(TABLE_COLUMNS) == ROW_FIELDS
        # Each distinct scheduling once: calm's three workers share one form, the notify
        # worker and the job the kernel's default.
        assert len(table["sched"]) == 2
        assert all(len(r) == len(TABLE_COLUMNS) for r in table["rows"])
        rows = table_rows(table)
        assert len(rows) == len(maps) == 5
        for got, want in zip(rows, maps, strict=True):
            # Field for field, nil where the map has no such field.
            assert without_uptime([got]) == without_uptime([{c: want.get(c) for c in got}])
            assert (got["uptime"] is None) == (want["uptime"] is None)
        assert {r["tenant"] for r in rows} == {"calm", "talky", "job"}
        assert rows[-1]["job"] == 1 and rows[-1]["sched"] is not None
        assert rows[1]["notify_socket"] is not None or rows[3]["notify_socket"] is not None

    one = await d.call("status", tenant="calm", table=True)
    assert [r["name"] for r in table_rows(one)] == [f"calm:w-{i}" for i in range(3)]
    assert len(one["sched"]) == 1
    picked = await d.call("status", fields=["name", "sched", "state"], table=True)
    assert picked["columns"] == ["name", "sched", "state"]
    assert table_rows(picked) == [
        {"name": m["name"], "sched": m["sched"], "state": m["state"]} for m in maps
    ]
    jobs = await d.call("status", tenant="job", fields=["job", "state"], table=True)
    assert jobs == {"columns": ["job", "state"], "rows": [[1, "running"]], "sched": []}
    with pytest.raises(RpcError) as err:
        await d.call("status", table="yes")
    assert err.value.code == ErrorCode.BAD_REQUEST


def test_a_sched_reading_is_kept_for_its_max_age_only() -> None:
    import subprocess

    from supervisord_qnx.control.statusrows import SchedReader

    reader = SchedReader(max_age=0.1)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        first = reader.read([proc.pid], now=100.0)[proc.pid]
        assert msgpack.unpackb(first)["nice"] == 0
        os.setpriority(os.PRIO_PROCESS, proc.pid, 7)
        # Within the max age the reading of a moment ago; after it, the kernel's again.
        assert reader.read([proc.pid], now=100.09)[proc.pid] == first
        assert msgpack.unpackb(reader.read([proc.pid], now=100.11)[proc.pid])["nice"] == 7
        # Without a time (``with_sched``'s callers), always the kernel's.
        os.setpriority(os.PRIO_PROCESS, proc.pid, 9)
        assert msgpack.unpackb(reader.read([proc.pid])[proc.pid])["nice"] == 9
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # A pid gone answers nil and is not kept.
    assert reader.read([proc.pid], now=100.3)[proc.pid] == b"\xc0"
    assert reader.read([proc.pid], now=100.31)[proc.pid] == b"\xc0"


async def test_a_workers_new_scheduling_shows_within_the_max_age(
    cfg: ConfigDir, start_daemon
) -> None:
    import time

    from supervisord_qnx.control.statusrows import SCHED_MAX_AGE, SCHED_SETTLE

    tenants(cfg)
    d = await start_daemon()
    w = await d.wait_for("calm:w-0", lambda w: (w["sched"] or {}).get("nice") == 5)
    # Readings are kept once a run is past its first moments.
    await d.wait_for("calm:w-0", lambda w: w["uptime"] > SCHED_SETTLE + 0.1)
    for _ in range(5):
        await d.call("status")  # the reading kept
    os.setpriority(os.PRIO_PROCESS, w["pid"], 11)
    changed = time.monotonic()
    w = await d.wait_for("calm:w-0", lambda w: w["sched"]["nice"] == 11)
    # wait_for polls every few ms; the kept reading is at most SCHED_MAX_AGE old.
    assert time.monotonic() - changed < SCHED_MAX_AGE + 0.5
    assert w["state"] == "running"


def test_kept_sched_readings_of_many_pids_are_used_and_dead_ones_dropped() -> None:
    import subprocess

    from supervisord_qnx.control.statusrows import SchedReader

    reader = SchedReader(max_age=0.1)
    asked: list[int] = []
    real = reader._read

    def counting(pids: list[int]) -> dict[int, bytes]:
        asked.extend(pids)
        return real(pids)

    reader._read = counting  # type: ignore[method-assign]
    a, b = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    try:
        # status reads SCHED_STEP pids at a time: one step's readings are kept beside the
        # other steps' (hundreds of workers' readings among them), not swept by the next.
        reader.read([a.pid], now=10.0)
        for pid in range(300):
            reader._kept[10_000_000 + pid] = (10.0, b"\xc0")
        reader.read([b.pid], now=10.01)
        reader.read([a.pid], now=10.02)
        assert asked == [a.pid, b.pid]
        # Readings too old to be used again are swept once they pile up.
        reader.read([a.pid, b.pid], now=20.0)
        assert asked[2:] == [a.pid, b.pid]
        for pid in range(600):
            reader._kept[20_000_000 + pid] = (0.0, b"\xc0")
        reader.read([a.pid], now=20.2)  # a reading is made: the sweep comes with it
        assert set(reader._kept) == {a.pid}  # b's reading of 20.0 is too old as well
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait(timeout=10)
