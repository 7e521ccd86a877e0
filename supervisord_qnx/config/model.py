"""Validated models of the daemon config and tenant files. Pure: no file I/O here.

Every model forbids unknown keys, because a misspelt limit that is silently
ignored is a tenant running without the limit its author wrote. Relative paths
are resolved against the directory of the file that names them, which the
loader passes in the validation context as ``base_dir``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from supervisord_qnx.partition import realtime
from supervisord_qnx.partition.controls import Flag
from supervisord_qnx.partition.privileges import CAPABILITIES
from supervisord_qnx.partition.tree import PartitionTree
from supervisord_qnx.units import parse_size

Size = Annotated[int, BeforeValidator(parse_size)]
Percent = Annotated[float, Field(gt=0, le=100)]
BackendName = Literal["auto", "portable", "cgroup1", "cgroup2", "qnx"]

# Partition and worker names become path components (cgroup directories, APS
# names after mapping, log file names): keep them to a portable alphabet.
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def _resolve(value: object, info: ValidationInfo) -> object:
    """Resolve a relative path against the directory of the file that names it."""
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            # normpath, not resolve(): keep symlinks the operator chose, drop "..".
            path = Path(os.path.normpath(Path(base) / path))
        return path
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Memory(Strict):
    """The seed's three figures: ``min`` guaranteed, ``max`` hard cap, ``reserved`` a band
    at the top of ``max`` whose crossing raises memory pressure before ``max`` kills."""

    min: Size = 0
    max: Size | None = None
    reserved: Size = 0

    @model_validator(mode="after")
    def _band_fits(self) -> Memory:
        if self.max is not None and self.min + self.reserved > self.max:
            raise ValueError(
                f"min + reserved ({self.min} + {self.reserved} bytes) "
                f"exceeds max ({self.max} bytes)"
            )
        if self.max is None and self.reserved:
            raise ValueError("reserved needs a max: the band sits just below max")
        return self


# -- real-time keys (issue 15, docs/realtime.md) ----------------------------------------


class Critical(Strict):
    """QNX APS critical budget: milliseconds per averaging window that threads at or
    above ``priority`` may run even when the partition's budget is spent."""

    budget_ms: Annotated[int, Field(ge=1, le=100_000)]
    priority: Annotated[int, Field(ge=1, le=255)] | None = None


class Sched(Strict):
    """A worker's scheduling policy: ``priority`` in the policy's range as the kernel
    reports it (0 for other/batch/idle, 1-99 for fifo/rr on Linux); ``nice`` only where
    the kernel honours it (other, batch)."""

    policy: Literal["other", "batch", "idle", "fifo", "rr"] = "other"
    priority: int = 0
    nice: Annotated[int, Field(ge=-20, le=19)] | None = None

    @model_validator(mode="after")
    def _in_range(self) -> Sched:
        lo, hi = realtime.priority_range(self.policy)
        if not lo <= self.priority <= hi:
            raise ValueError(
                f"priority {self.priority} is outside {lo}..{hi}, the range of policy "
                f"{self.policy!r} on this kernel"
            )
        if self.nice is not None and self.policy not in ("other", "batch"):
            raise ValueError(f"nice has no effect under policy {self.policy!r}; remove it")
        return self


def _existing_cpus(value: list[int]) -> list[int]:
    missing = realtime.missing_cpus(value)
    if missing:
        raise ValueError(
            f"CPU {', '.join(map(str, missing))} does not exist on this machine "
            f"(it has CPUs {realtime.format_cpulist(realtime.host_cpus())})"
        )
    return sorted(set(value))


def _cpuset(value: object) -> object:
    if not isinstance(value, str):
        return value
    cpus = realtime.parse_cpulist(value)
    _existing_cpus(list(cpus))
    return realtime.format_cpulist(cpus)


Cpus = Annotated[
    list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_existing_cpus)
]
CpuSet = Annotated[str, BeforeValidator(_cpuset)]


class Realtime(Strict):
    """The keys a tenant and each of its workers may set; a worker's own keys override
    its tenant's, key by key (``effective_realtime``)."""

    sched: Sched | None = None
    cpus: Cpus | None = None  # affinity, inside the partition's cpuset
    # Raise RLIMIT_MEMLOCK so the program may mlockall(): true = unlimited, or a size.
    memlock: bool | Size | None = None


class Cpu(Strict):
    """Percent of one machine. ``budget`` is guaranteed and taken from the parent's budget
    (QNX adaptive partitioning); ``max`` is a hard ceiling, at least the budget."""

    budget: Percent | None = None
    max: Percent | None = None
    critical: Critical | None = None

    @model_validator(mode="after")
    def _max_covers_budget(self) -> Cpu:
        if self.budget is not None and self.max is not None and self.max < self.budget:
            raise ValueError(f"max ({self.max}%) is below budget ({self.budget}%)")
        return self


class PartitionSpec(Strict):
    """A shared partition group (``[[partition]]`` in the daemon config)."""

    name: Name
    parent: str = ""
    flags: list[Flag] = Field(default_factory=list)
    memory: Memory = Memory()
    cpu: Cpu = Cpu()
    pids: Annotated[int, Field(ge=1)] | None = None
    # CPUs the partition owns (cgroup cpuset), a kernel cpulist such as "0-1" or "1".
    cpuset: CpuSet | None = None

    @field_validator("parent")
    @classmethod
    def _parent_is_path(cls, value: str) -> str:
        value = value.strip("/")
        for part in value.split("/") if value else []:
            if not re.match(NAME_PATTERN, part):
                raise ValueError(f"{value!r} is not a partition path like 'tenants' or 'a/b'")
        return value

    @property
    def path(self) -> str:
        return f"{self.parent}/{self.name}" if self.parent else self.name


def _signal_number(value: object) -> object:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise ValueError(f"{value!r} is not a signal name such as 'TERM' or 'SIGINT'") from None
    return value


SignalNumber = Annotated[int, BeforeValidator(_signal_number), Field(ge=1, le=64)]
ResolvedPath = Annotated[Path, BeforeValidator(_resolve)]


class LogSpec(Strict):
    """How a worker's output is kept (docs/logging.md): numbered files of at most
    ``max_size`` bytes each, ``keep`` older ones besides the current. A key left out is
    taken from the level above (worker, tenant, ``[daemon.log]``)."""

    # At least 4 KiB: a file must hold a few whole lines, and lines longer than a file
    # are cut into pieces of the file's size.
    max_size: Annotated[Size, Field(ge=4096)] | None = None
    keep: Annotated[int, Field(ge=0, le=1000)] | None = None


class WorkerBase(Realtime):
    name: Name
    cwd: ResolvedPath | None = None
    env: dict[str, str] = Field(default_factory=dict)
    instances: Annotated[int, Field(ge=1, le=1000)] = 1
    stop_signal: SignalNumber = int(signal.SIGTERM)
    stop_timeout: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # Readiness and liveness over sd_notify (docs/configuration.md): "notify" keeps a
    # worker `starting` until it sends READY=1; `watchdog` seconds without WATCHDOG=1
    # kill it. Either one gives the worker its own NOTIFY_SOCKET.
    ready: Literal["started", "notify"] = "started"
    start_timeout: Annotated[float, Field(gt=0, le=86400)] = 90.0
    watchdog: Annotated[float, Field(ge=0.01, le=86400)] | None = None

    @property
    def uses_notify(self) -> bool:
        return self.ready == "notify" or self.watchdog is not None

    log: LogSpec | None = None

    # Identity (docs/security.md#tenants): None takes the tenant's.
    user: str | None = None
    group: str | None = None
    supplementary_groups: list[str] | None = None


class CommandWorker(WorkerBase):
    """A worker that is any program: ``command = ["python3", "-u", "beat.py"]``."""

    kind: Literal["command"] = "command"
    command: Annotated[list[str], Field(min_length=1)]


class WasmLimits(Strict):
    """Limits the engine enforces from inside, before the OS partition has to."""

    memory: Size | None = None  # linear memory cap; default derived from the partition's max
    tables: Annotated[int, Field(ge=1)] | None = None  # max table elements
    instances: Annotated[int, Field(ge=1)] | None = None
    fuel: Annotated[int, Field(ge=1)] | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None  # epoch deadline in seconds


class WasmWorker(WorkerBase):
    """A WebAssembly (WASI) module run by the daemon's wasm runner under wasmtime."""

    kind: Literal["wasm"] = "wasm"
    wasm: ResolvedPath
    args: list[str] = Field(default_factory=list)
    preopen: dict[str, ResolvedPath] = Field(default_factory=dict)
    limits: WasmLimits = WasmLimits()

    @field_validator("wasm")
    @classmethod
    def _module_kind(cls, value: Path) -> Path:
        if value.suffix not in (".wasm", ".wat"):
            raise ValueError(f"{value}: a module must be a .wasm binary or a .wat text file")
        # Whether the file exists and decodes is checked by the loader (load.py): the
        # models stay free of file I/O.
        return value


def _worker_kind(value: Any) -> str | None:
    # Users write either `command = [...]` or `wasm = "..."`; the key says the kind.
    if isinstance(value, dict):
        if "kind" in value:
            return str(value["kind"])
        return "wasm" if "wasm" in value else "command"
    return getattr(value, "kind", None)


Worker = Annotated[
    Annotated[CommandWorker, Tag("command")] | Annotated[WasmWorker, Tag("wasm")],
    Discriminator(_worker_kind),
]


class RestartSpec(Strict):
    """Erlang/OTP-style: exponential backoff, and more than ``max_restarts`` in ``window``
    seconds makes the worker ``fatal``."""

    policy: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial: Annotated[float, Field(ge=0, le=3600)] = 0.1
    backoff_max: Annotated[float, Field(ge=0, le=3600)] = 10.0
    max_restarts: Annotated[int, Field(ge=0)] = 5
    window: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _backoff_order(self) -> RestartSpec:
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max}s) is below backoff_initial "
                f"({self.backoff_initial}s)"
            )
        return self


def _capability(value: object) -> object:
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in CAPABILITIES:
            raise ValueError(f"{value!r} is not a Linux capability such as 'CAP_NET_BIND_SERVICE'")
        return name
    return value


def _umask(value: object) -> object:
    # TOML has octal integers (0o077); a string "077" is read as octal too.
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal umask such as '077'") from None
    return value


Capability = Annotated[str, BeforeValidator(_capability)]
Umask = Annotated[int, BeforeValidator(_umask), Field(ge=0, le=0o777)]
# -1 means "unlimited" for every resource limit.
RlimitCount = Annotated[int, Field(ge=-1)]
RlimitSize = Annotated[int, BeforeValidator(lambda v: -1 if v == "unlimited" else parse_size(v))]


class Rlimits(Strict):
    """Resource limits (soft = hard) a tenant's workers start with; None: the daemon's."""

    nofile: Annotated[int, Field(ge=1)] | None = None
    core: RlimitSize | None = 0  # no core dumps unless a tenant asks for them
    nproc: Annotated[int, Field(ge=1)] | None = None
    stack: RlimitSize | None = None


class TenantSpec(PartitionSpec, Realtime):
    """One tenant file: its own partition ``<parent>/<name>`` and the workers inside it."""

    parent: str = "tenants"
    autostart: bool = True
    # Tenants whose workers must run before this one starts, and that stop after it
    # (config/ordering.py; the loader rejects unknown names and cycles).
    after: list[Name] = Field(default_factory=list)
    restart: RestartSpec = RestartSpec()
    log: LogSpec | None = None
    # Identity and privileges (docs/security.md#tenants; config/identity.py resolves them).
    user: str | None = None  # a name, a number or "dynamic"; None: [daemon] default_user
    group: str | None = None  # None: the user's primary group
    supplementary_groups: list[str] = Field(default_factory=list)
    allow_root: bool = False  # the only way a worker runs as uid 0
    capabilities: list[Capability] = Field(default_factory=list)
    umask: Umask = 0o077
    rlimits: Rlimits = Rlimits()
    # The container flag (docs/security.md#container): what stays writable, the network.
    writable: list[ResolvedPath] = Field(default_factory=list)
    network: Literal["host", "none"] = "host"
    # Hand the tenant's partition directory to its user (systemd's Delegate=).
    delegate: bool = False
    # A syscall filter on every worker (docs/security.md#seccomp, partition/seccomp.py).
    seccomp: Literal["none", "default"] = "none"
    worker: Annotated[list[Worker], Field(min_length=1)]

    @field_validator("writable")
    @classmethod
    def _plain_paths(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if any(c.isspace() for c in str(path)) or str(path) == "/":
                raise ValueError(f"{str(path)!r}: a writable path must not be / or hold spaces")
        return value

    @model_validator(mode="after")
    def _container_keys(self) -> TenantSpec:
        if Flag.CONTAINER not in self.flags and (self.writable or self.network != "host"):
            raise ValueError('writable and network need flags = ["container"]')
        return self

    @model_validator(mode="after")
    def _unique_workers(self) -> TenantSpec:
        seen: set[str] = set()
        for w in self.worker:
            if w.name in seen:
                raise ValueError(f"two workers are named {w.name!r}")
            seen.add(w.name)
        return self


class DaemonSpec(Strict):
    socket: ResolvedPath = Path("run/control.sock")
    socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o600
    # The socket's (and its directory's) owner group, a name or a gid, so that an
    # operator group can connect without root (docs/security.md, "The control socket").
    socket_group: str | Annotated[int, Field(ge=0)] | None = None
    state_dir: ResolvedPath = Path("run/state")
    log_dir: ResolvedPath = Path("run/log")
    backend: BackendName = "auto"
    enforcement: Literal["strict", "best-effort"] = "strict"
    tenants: str = "tenants.d/*.toml"
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Where kernel backends root our partitions; None means the backend's default.
    cgroup_root: str | None = None
    # User-space accounting period of the portable/qnx backends (seconds).
    sample_interval: Annotated[float, Field(ge=0.01, le=60)] = 0.25
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1 << 20
    # Events queued for one live-events subscriber before it is dropped (overflow).
    subscriber_queue: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    # Start wasm workers by forking a pre-initialised process (docs/wasm.md, 7.) where
    # the backend and platform allow it; false: always the plain runner.
    wasm_prefork: bool = True
    # node_exporter's textfile collector: the `metrics` text written here (atomically)
    # every metrics_interval seconds; None writes nothing (docs/metrics.md).
    metrics_textfile: ResolvedPath | None = None
    metrics_interval: Annotated[float, Field(ge=0.1, le=86400)] = 15.0
    # Defaults for every worker's log rotation; tenants and workers override per key.
    log: LogSpec = LogSpec(max_size=10 << 20, keep=5)
    # fifo/rr workers need a partition with cpu.max below 100% of its CPUs, unless this
    # is true (docs/realtime.md): a runaway real-time loop must not own the machine.
    allow_unbounded_realtime: bool = False
    # What a start does with workers a previous daemon left running (docs/operations.md,
    # "Upgrades and restarts"): adopt them (they keep running), or stop them and start
    # afresh.
    on_restart: Literal["adopt", "restart"] = "adopt"
    # Who a tenant without `user` runs as (docs/security.md#tenants): a user name or
    # number, or "dynamic" for a uid of its own from `dynamic_uids` per tenant.
    default_user: str = "nobody"
    dynamic_uids: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (61184, 65519)

    @field_validator("dynamic_uids")
    @classmethod
    def _uid_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[1] < value[0]:
            raise ValueError(f"the range {value[0]}..{value[1]} is empty")
        return value

    @field_validator("log")
    @classmethod
    def _log_complete(cls, value: LogSpec) -> LogSpec:
        # The daemon's table is the last level: a key left out keeps the built-in default.
        return LogSpec(
            max_size=10 << 20 if value.max_size is None else value.max_size,
            keep=5 if value.keep is None else value.keep,
        )


# -- the control socket: who may do what, and the server's limits (docs/security.md) --

UserOrGroup = str | Annotated[int, Field(ge=0)]


class Grant(Strict):
    """``[[control.grant]]``: a role for the peers whose uid, or one of whose groups, is
    listed. ``operator`` needs ``tenants``: the tenants it may act on."""

    role: Literal["admin", "operator", "viewer"]
    uids: list[UserOrGroup] = Field(default_factory=list)
    groups: list[UserOrGroup] = Field(default_factory=list)
    tenants: list[Name] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> Grant:
        if not self.uids and not self.groups:
            raise ValueError("a grant needs uids or groups: whom it is for")
        if self.role == "operator" and not self.tenants:
            raise ValueError("an operator grant needs tenants: the tenants it may act on")
        if self.role != "operator" and self.tenants:
            raise ValueError(f"tenants is for operator grants; a {self.role} has no tenant list")
        return self


class ControlSpec(Strict):
    """``[control]``: grants, and the limits that keep one client from costing the
    others anything. Limits take effect at daemon start; grants also at ``reload``."""

    grant: list[Grant] = Field(default_factory=list)
    # None: as many as the descriptor limit leaves after the daemon's own needs (≤ 4096).
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_connections_per_uid: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 64
    # A connection with nothing running and nothing subscribed, silent this long, is closed.
    idle_timeout: Annotated[float, Field(gt=0, le=86400)] = 600.0
    # The whole of one message must arrive within this many seconds of its first byte.
    frame_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_depth: Annotated[int, Field(ge=4, le=512)] = 32
    max_elements: Annotated[int, Field(ge=16, le=10_000_000)] = 100_000
    # What requests being received or run may hold, summed over all connections.
    decode_budget: Annotated[Size, Field(ge=1 << 20)] = 64 << 20


class DaemonFile(Strict):
    """The top-level daemon config file as written."""

    daemon: DaemonSpec = DaemonSpec()
    control: ControlSpec = ControlSpec()
    partition: list[PartitionSpec] = Field(default_factory=list)


class Config(BaseModel):
    """The whole validated configuration: what the rest of the daemon works from, with
    its admitted partition tree (``load`` builds it once)."""

    # Not built until something validates one: ``load`` constructs it from parts it has
    # validated already (a validator and serializer spanning every model: 0.3 MiB of the
    # daemon's RSS, issue 14). Built as usual at a first ``Config(...)`` elsewhere.
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, defer_build=True)

    path: Path
    daemon: DaemonSpec
    partitions: list[PartitionSpec]
    tenants: list[TenantSpec]
    tenant_files: dict[str, Path]  # tenant name -> file, for error messages and reload
    tree: PartitionTree
    control: ControlSpec = ControlSpec()

    def file_for(self, partition: str) -> Path:
        """The file that declares a partition: its tenant's file, else the daemon's."""
        for t in self.tenants:
            if t.path == partition:
                return self.tenant_files[t.name]
        return self.path
