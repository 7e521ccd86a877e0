"""The runtime state's tenants kept as text (supervise/statebody.py).

A write of the runtime state takes its body on the event loop; made whole, it held the
loop for 19-27 ms at 1,000 workers, and a restart or a ``status`` call that fell into it
waited (issue 14). These tests hold the two things the kept text must do: say exactly
what a whole encoding of ``adopt.snapshot`` says (the file's checksum is of that text, and
a successor daemon adopts from it), and be made again only for the workers that changed.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisord_qnx.supervise import adopt, statebody
from supervisord_qnx.supervise import state as runtime_state
from tests.conftest import ConfigDir

pytestmark = pytest.mark.integration


def whole(d: Any) -> str:
    """The tenants' text as a whole encoding gives it, from the daemon's own objects."""
    return runtime_state.dumps(adopt.snapshot(d.daemon.supervisor, {})["tenants"])


async def settled(d: Any, names: list[str]) -> None:
    """Until each worker named is running with a pid (as a user would poll)."""
    for name in names:
        await d.wait_for(name, lambda w: w["state"] == "running" and w["pid"])


async def test_the_kept_text_is_the_whole_encoding_through_starts_exits_and_stops(
    cfg: ConfigDir, start_daemon
) -> None:
    cfg.tenant("steady", '[[worker]]\nname = "w"\ninstances = 3\ncommand = ["sleep", "1000"]\n')
    # A crash loop: exits, exit reasons, backoff deadlines and restart counts change.
    cfg.tenant(
        "loop",
        'restart = { policy = "always", backoff_initial = 0.05, backoff_max = 0.2 }\n'
        '[[worker]]\nname = "w"\ncommand = ["sh", "-c", "sleep 0.05; exit 3"]\n',
    )
    cfg.tenant("later", 'autostart = false\n[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon()
    body = statebody.StateBody()
    sup = d.daemon.supervisor
    await settled(d, ["steady:w-0", "steady:w-1", "steady:w-2"])
    seen_states: set[str] = set()
    with trio.fail_after(30):
        # Taken many times while the crash loop goes round, each compared at once (the
        # loop does not run between the two encodings: nothing changes in between).
        for _ in range(60):
            assert body.tenants(sup) == whole(d)
            seen_states.add(str(sup.tenant("loop").instances[0].lc.state))
            await trio.sleep(0.01)
        # A stop of a tenant that is already stopped changes only the operator's word.
        await d.call("stop", tenant="later", wait=True)
        assert json.loads(body.tenants(sup))["later"]["operator"] == "stopped"
        assert body.tenants(sup) == whole(d)
        await d.call("start", tenant="later", wait=True)
        assert body.tenants(sup) == whole(d)
        await d.call("stop", tenant="steady", wait=True)
        assert body.tenants(sup) == whole(d)
    # The loop was seen in more than one state: the comparisons covered its changes.
    assert len(seen_states) > 1, seen_states
    loop = json.loads(body.tenants(sup))["loop"]["instances"]["w-0"]
    assert loop["restarts"] > 0 and loop["exit_reason"] == "exit:3", loop


async def test_only_the_workers_that_changed_are_made_again(cfg: ConfigDir, start_daemon) -> None:
    cfg.tenant("many", '[[worker]]\nname = "w"\ninstances = 20\ncommand = ["sleep", "1000"]\n')
    cfg.tenant("one", '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon()
    await settled(d, [f"many:w-{i}" for i in range(20)] + ["one:w-0"])
    body = statebody.StateBody()
    sup = d.daemon.supervisor
    body.tenants(sup)
    first = body.rebuilt
    assert first == 21, first
    # Nothing changed: nothing is made again, and the text is the same.
    text = body.tenants(sup)
    assert body.rebuilt == first
    assert text == whole(d)
    with trio.fail_after(30):
        await d.call("stop", tenant="one", wait=True)
    text = body.tenants(sup)
    assert body.rebuilt == first + 1, body.rebuilt - first
    assert text == whole(d)


async def test_the_state_file_written_from_the_kept_text_is_read_back_whole(
    cfg: ConfigDir, start_daemon
) -> None:
    """The digest is of the spliced text: a successor must find it intact, with every
    worker recorded."""
    cfg.tenant("a", '[[worker]]\nname = "w"\ninstances = 2\ncommand = ["sleep", "1000"]\n')
    cfg.tenant("b", '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon()
    await settled(d, ["a:w-0", "a:w-1", "b:w-0"])
    with trio.fail_after(30):
        await d.daemon.state.write_now()
    loaded = runtime_state.load(Path(d.daemon.config.daemon.state_dir))
    assert loaded is not None
    assert loaded["reason"] == "running"
    running = {
        (t, leaf): rec["pid"]
        for t, trec in loaded["tenants"].items()
        for leaf, rec in trec["instances"].items()
    }
    status = {(w["tenant"], f"w-{w['instance']}"): w["pid"] for w in await d.call("status")}
    assert running == status


def test_a_raw_value_is_spliced_as_the_text_it_stands_for() -> None:
    value = {"z": [1, 2.5, None], "a": {"é": "x", "b": True}}
    body = {"tenants": runtime_state.Raw(runtime_state.dumps(value)), "b": 1, "zz": "q"}
    assert runtime_state.canonical(body) == runtime_state.dumps({**body, "tenants": value})
    # And the file made from it passes the digest check a successor makes.
    data = runtime_state.encode(body)
    assert runtime_state.decode(data) == {**body, "tenants": value}


async def test_coalesced_writes_take_the_body_in_steps_and_say_the_same(
    cfg: ConfigDir, start_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write after a change lets the loop run between steps of its snapshot (a
    restart's next step, a status answer wait for one step, not the whole body), and
    the steps put together say what a whole encoding says."""
    monkeypatch.setattr(statebody, "STEP", 2)
    for name in "abcde":
        cfg.tenant(name, '[[worker]]\nname = "w"\ncommand = ["sleep", "1000"]\n')
    d = await start_daemon()
    await settled(d, [f"{n}:w-0" for n in "abcde"])
    keeper = d.daemon.state
    taken = keeper.snapshot_in_steps
    pauses: list[int] = []
    texts: list[tuple[str, str]] = []

    async def counting(pause: Any) -> dict[str, Any]:
        async def counted() -> None:
            pauses.append(1)
            await pause()

        body = await taken(counted)
        texts.append((body["tenants"], whole(d)))
        return body

    with trio.fail_after(30):
        await d.call("stop", tenant="c", wait=True)
        # Settled: nothing changes during the write below, so the two texts must agree.
        keeper.snapshot_in_steps = counting
        keeper.changed()  # what every state change and event does
        while not texts:
            await trio.sleep(0.01)
    # Five tenants two at a time: two pauses between three steps.
    assert len(pauses) == 2, pauses
    spliced, encoded = texts[0]
    assert spliced == encoded
    assert json.loads(spliced)["c"]["operator"] == "stopped"


async def test_a_big_state_is_written_no_faster_than_its_byte_rate(tmp_path: Path) -> None:
    """While changes keep coming (restarts one after another), a body of 600 KB is
    written at most every 0.1 s (MAX_BYTES_PER_SECOND), not every COALESCE: the cheap
    snapshot must not turn into 300 KB and two fsyncs fifty times a second."""
    keeper = runtime_state.StateKeeper(tmp_path, lambda: {"filler": "x" * 600_000})
    spacing = 600_000 / runtime_state.MAX_BYTES_PER_SECOND
    assert spacing > 4 * runtime_state.COALESCE  # the rule, not COALESCE, is what is seen
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        began = trio.current_time()
        while trio.current_time() - began < 1.0:
            keeper.changed()
            await trio.sleep(0.005)
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    # Every wait between two writes lasts at least `spacing` (sleeps never end early):
    # the first write after the first wait, then at most one per `spacing`.
    assert 1 <= keeper.figures.writes <= elapsed / spacing + 1, keeper.figures.writes
    assert runtime_state.load(tmp_path) is not None


BODY = {"tenants": {f"t{i}": {"pid": i, "reason": "signal:SIGKILL"} for i in range(300)}}


def test_the_state_files_bytes_carry_the_bodys_text_and_its_checksum() -> None:
    """``wrap``: the body's canonical text as it is, then its CRC-32, the format and the
    version (2); what ``decode`` reads back is the body."""
    text = runtime_state.dumps(BODY)
    data = runtime_state.wrap(text)
    assert data.startswith(b'{\n "body": ' + text.encode() + b",\n")
    outer = json.loads(data)
    assert outer["crc32"] == f"{zlib.crc32(text.encode()):08x}"
    assert (outer["format"], outer["version"]) == (runtime_state.FORMAT, 2)
    assert runtime_state.decode(data) == BODY


def test_a_version_1_file_is_read_by_its_sha256_and_refused_when_it_does_not_match() -> None:
    """Files of daemons before the CRC (version 1, SHA-256) are read, so an upgrade
    adopts; a changed body fails either way; other versions are refused by name."""
    text = runtime_state.dumps(BODY)
    outer = {"format": runtime_state.FORMAT, "version": 1}
    v1 = {"body": BODY, **outer, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    assert runtime_state.decode(json.dumps(v1).encode()) == BODY
    v1["sha256"] = hashlib.sha256(b"x" + text.encode()).hexdigest()
    with pytest.raises(runtime_state.Unusable, match="checksum mismatch"):
        runtime_state.decode(json.dumps(v1).encode())
    # A version 2 body changed by one character, its checksum left as it was.
    edited = runtime_state.wrap(text).replace(b'"pid":7,', b'"pid":8,', 1)
    with pytest.raises(runtime_state.Unusable, match="checksum mismatch"):
        runtime_state.decode(edited)
    # Version 1's key on a version 2 file is no checksum of it.
    v2 = json.loads(runtime_state.wrap(text))
    v2["sha256"] = v2.pop("crc32")
    with pytest.raises(runtime_state.Unusable, match="checksum mismatch"):
        runtime_state.decode(json.dumps(v2).encode())
    for version in (3, "2", None, True):
        newer = {**json.loads(runtime_state.wrap(text)), "version": version}
        with pytest.raises(runtime_state.Unusable, match="reads versions 1 and 2 only"):
            runtime_state.decode(json.dumps(newer).encode())
