"""Loading a config: every problem located exactly (``file: key: reason``, what
``--check`` prints), worker kinds, signal names and paths. Fast, in-process unit tests
of ``config/``; the CLI tests show the same lines through ``supervisord-qnx --check``.

Written against surviving mutants of ``make mutate`` (docs/testing.md): each test pins
a behaviour that a mutant changed without any fast test noticing.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from supervisord_qnx.config.load import ConfigError, Located, load
from supervisord_qnx.config.model import CommandWorker, WasmWorker

GROUP = '[[partition]]\nname = "tenants"\nflags = ["hierarchical"]\n'
W = '[[worker]]\nname = "w"\ncommand = ["true"]\n'
VALID_WAT = '(module (func (export "_start")))'


def write(root: Path, daemon: str, tenants: dict[str, str]) -> Path:
    (root / "tenants.d").mkdir(parents=True, exist_ok=True)
    for name, body in tenants.items():
        (root / "tenants.d" / f"{name}.toml").write_text(textwrap.dedent(body))
    path = root / "d.toml"
    path.write_text(daemon)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    lines = [str(p) for p in info.value.problems]
    assert str(info.value) == "\n".join(lines)  # the exception text is the same list
    return lines


# -- the daemon file ----------------------------------------------------------------------


def test_a_missing_daemon_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "absent.toml") == [f"{tmp_path}/absent.toml: no such file"]


def test_a_daemon_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d.toml").mkdir()
    assert problems(tmp_path / "d.toml") == [f"{tmp_path}/d.toml: cannot read: Is a directory"]


def test_a_daemon_file_with_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\n", {})
    [line] = problems(path)
    assert line.startswith(f"{path}: TOML syntax error: ")


def test_daemon_file_problems_name_key_and_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[daemon]\nsockett = "x"\n'
        + GROUP
        + 'memory = { min = "2M", max = "1M" }\n'
        + '[[partition]]\nname = "x"\nparent = "a//b c"\n',
        {},
    )
    assert problems(path) == [
        f"{path}: daemon.sockett: unknown key (check the spelling; see docs/configuration.md)",
        # "Value error, " (pydantic's prefix) is not the operator's business.
        f"{path}: partition[0].memory: min + reserved (2097152 + 0 bytes) exceeds max "
        "(1048576 bytes)",
        f"{path}: partition[1].parent: 'a//b c' is not a partition path like 'tenants' or 'a/b'",
    ]


def test_problems_of_partitions_point_at_the_daemon_file(tmp_path: Path) -> None:
    # Declared in the daemon file, so located there, under the partition's path.
    path = write(
        tmp_path,
        GROUP
        + 'cpu = { budget = 90 }\n[[partition]]\nname = "other"\ncpu = { budget = 20 }\n'
        + '[[partition]]\nname = "small"\nparent = "tenants"\nmemory = { max = "1M" }\n'
        + '[[partition]]\nname = "inner"\nparent = "tenants/small"\n',
        {},
    )
    assert problems(path) == [
        f"{path}: partition 'tenants/small/inner'.parent: 'tenants/small' is not "
        "'hierarchical', so it cannot hold 'tenants/small/inner'; add flags = "
        "[\"hierarchical\"] to 'tenants/small'",
        f"{path}: partition (root).cpu.budget: the children's cpu.budget add up to 110% "
        "('tenants' 90%, 'other' 20%) but the root partition has a budget of 100% to give",
    ]


# -- tenant files -------------------------------------------------------------------------


def test_every_tenant_problem_is_located_in_its_file(tmp_path: Path) -> None:
    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "tenants.d" / "dir.toml").mkdir()  # unreadable as a file
    path = write(
        tmp_path,
        GROUP,
        {
            "broken": "x = = 1\n",
            "typo": 'memroy = { max = "1GiB" }\n' + W,
            "types": '[[worker]]\nname = "w"\ncommand = "true"\nstop_signal = "NOPE"\n',
            "wasmtypo": '[[worker]]\nname = "w"\nwasm = "m.wat"\nlimits = { fuell = 1 }\n',
            "big": 'memory = { max = "1GiB" }\n' + W,
            "twin": 'name = "big"\n' + W,
        },
    )
    (tmp_path / "d.toml").write_text(GROUP + 'memory = { max = "512MiB" }\n')
    d = tmp_path / "tenants.d"
    lines = problems(path)
    assert lines == [
        # In file order, then the admission problems of the tenants that loaded.
        problems_line(lines, f"{d}/broken.toml: TOML syntax error: "),
        f"{d}/dir.toml: cannot read: Is a directory",
        # The worker union's tag ("command", "wasm") is not a key the user wrote.
        f"{d}/twin.toml: name: tenant 'big' is already defined in {d}/big.toml",
        f"{d}/types.toml: worker[0].stop_signal: 'NOPE' is not a signal name such as "
        "'TERM' or 'SIGINT'",
        f"{d}/types.toml: worker[0].command: Input should be a valid list",
        f"{d}/typo.toml: memroy: unknown key (check the spelling; see docs/configuration.md)",
        f"{d}/wasmtypo.toml: worker[0].limits.fuell: unknown key (check the spelling; see "
        "docs/configuration.md)",
        f"{d}/big.toml: memory.max: max 1GiB of 'tenants/big' exceeds the max 512MiB in "
        "force at 'tenants'",
    ]


def problems_line(lines: list[str], start: str) -> str:
    """The one line that starts with ``start`` (for reasons quoting a library's text)."""
    [line] = [line for line in lines if line.startswith(start)]
    return line


def test_wasm_module_problems_name_the_module(tmp_path: Path) -> None:
    (tmp_path / "ok.wat").write_text(VALID_WAT)
    (tmp_path / "bad.wat").write_text("(module (func (i32.add)))")
    path = write(
        tmp_path,
        GROUP,
        {
            "fine": '[[worker]]\nname = "w"\nwasm = "../ok.wat"\n',
            "lost": '[[worker]]\nname = "a"\ncommand = ["true"]\n'
            '[[worker]]\nname = "w"\nwasm = "../gone.wasm"\n',
            "bad": '[[worker]]\nname = "w"\nwasm = "../bad.wat"\n',
        },
    )
    d = tmp_path / "tenants.d"
    lines = problems(path)
    assert lines[1] == f"{d}/lost.toml: worker[1].wasm: {tmp_path}/gone.wasm: no such module file"
    assert lines[0].startswith(f"{d}/bad.toml: worker[0].wasm: {tmp_path}/bad.wat: ")
    assert "type mismatch" in lines[0]
    assert len(lines) == 2


def test_located_renders_with_and_without_a_key() -> None:
    assert str(Located("f.toml", "a.b", "why")) == "f.toml: a.b: why"
    assert str(Located("f.toml", "", "why")) == "f.toml: why"
    assert Located("f.toml", "a.b", "why").as_dict() == {
        "file": "f.toml",
        "key": "a.b",
        "reason": "why",
    }


# -- what a valid config becomes ----------------------------------------------------------


def test_worker_kinds_signals_and_paths(tmp_path: Path) -> None:
    (tmp_path / "m.wat").write_text(VALID_WAT)
    path = write(
        tmp_path,
        '[daemon]\nlog_dir = "/var/log/sqnx"\nstate_dir = "state"\n' + GROUP,
        {
            "t": """
            [[worker]]
            name = "wasm"
            wasm = "../m.wat"
            stop_signal = "int"
            [[worker]]
            name = "explicit"
            kind = "command"
            command = ["true"]
            stop_signal = "SIGKILL"
            [[worker]]
            name = "plain"
            command = ["true"]
            stop_signal = 12
            """,
        },
    )
    config = load(path)
    assert config.daemon.log_dir == Path("/var/log/sqnx")  # absolute: kept as written
    assert config.daemon.state_dir == tmp_path / "state"  # relative: to the naming file
    [tenant] = config.tenants
    assert config.file_for("tenants/t") == tmp_path / "tenants.d" / "t.toml"
    assert config.file_for("tenants") == path
    wasm, explicit, plain = tenant.worker
    assert isinstance(wasm, WasmWorker) and wasm.kind == "wasm"
    assert wasm.wasm == tmp_path / "m.wat"
    assert isinstance(explicit, CommandWorker) and isinstance(plain, CommandWorker)
    assert [w.stop_signal for w in tenant.worker] == [
        signal.SIGINT,
        signal.SIGKILL,
        signal.SIGUSR2,
    ]
    assert config.tenant_files == {"t": tmp_path / "tenants.d" / "t.toml"}


def test_an_absolute_tenants_pattern(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.toml").write_text(W)
    path = write(tmp_path, f'[daemon]\ntenants = "{elsewhere}/*.toml"\n' + GROUP, {"near": W})
    config = load(path)
    assert [t.name for t in config.tenants] == ["far"]
    assert config.tenant_files == {"far": elsewhere / "far.toml"}


def test_workers_given_as_models_keep_their_kind(tmp_path: Path) -> None:
    # Code that builds a tenant from worker objects (not TOML tables) gets them back as is.
    from supervisord_qnx.config.model import TenantSpec

    command = CommandWorker(name="c", command=["true"])
    wasm = WasmWorker(name="w", wasm=tmp_path / "m.wasm")
    tenant = TenantSpec(name="t", worker=[command, wasm])
    assert tenant.worker == [command, wasm]
    assert [type(w) for w in tenant.worker] == [CommandWorker, WasmWorker]


def test_file_level_problems_have_an_empty_key(tmp_path: Path) -> None:
    # --check --json prints as_dict(): a problem with no key says "", not null.
    (tmp_path / "tenants.d").mkdir()
    (tmp_path / "tenants.d" / "dir.toml").mkdir()
    (tmp_path / "tenants.d" / "bad.toml").write_text("x = = 1\n")
    path = write(tmp_path, GROUP, {})
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [p.as_dict()["key"] for p in info.value.problems] == ["", ""]
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.toml")
    assert [p.as_dict() for p in info.value.problems] == [
        {"file": str(tmp_path / "absent.toml"), "key": "", "reason": "no such file"}
    ]


def test_every_bad_module_of_a_tenant_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.wat").write_text("(module (func (i32.add)))")
    path = write(
        tmp_path,
        GROUP,
        {
            "two": '[[worker]]\nname = "a"\nwasm = "../gone.wasm"\n'
            '[[worker]]\nname = "b"\nwasm = "../bad.wat"\n'
        },
    )
    lines = problems(path)
    assert [line.split(": ")[1] for line in lines] == ["worker[0].wasm", "worker[1].wasm"]


def test_the_worker_kind_comes_from_kind_first_then_the_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GROUP,
        {
            "mixed": '[[worker]]\nname = "w"\nkind = "command"\nwasm = "m.wat"\n',
            "number": "worker = [5]\n",
        },
    )
    d = tmp_path / "tenants.d"
    assert problems(path) == [
        # kind = "command" wins over the wasm key: judged as a command worker.
        f"{d}/mixed.toml: worker[0].command: Field required",
        f"{d}/mixed.toml: worker[0].wasm: unknown key (check the spelling; see "
        "docs/configuration.md)",
        f"{d}/number.toml: worker[0]: Unable to extract tag using discriminator _worker_kind()",
    ]
