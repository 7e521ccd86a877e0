"""Read the daemon config and the tenant files, and report every problem at once.

Each problem is located as ``file: key.path: reason`` so an operator can go
straight to the line that is wrong. Nothing is started from a config with
problems: ``load`` raises ``ConfigError`` carrying all of them, not just the
first, because fixing one error per restart is how outages get long.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from supervisord_qnx import userdb
from supervisord_qnx.config import identity, ordering
from supervisord_qnx.config import realtime as rt
from supervisord_qnx.config.model import Config, DaemonFile, TenantSpec, WasmWorker
from supervisord_qnx.partition import tree as ptree


@dataclass(frozen=True)
class Located:
    """One config problem: the file, the dotted key path inside it, and the reason."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.key}: {self.reason}" if self.key else f"{self.file}: {self.reason}"
        )

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "key": self.key, "reason": self.reason}


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one of them."""

    def __init__(self, problems: list[Located]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif (
            item in ("command", "wasm")
            and i > 0
            and isinstance(loc[i - 1], int)
            and i + 1 < len(loc)
        ):
            # The worker union adds its tag ("command"/"wasm") as a path step the
            # user never wrote; the real key follows it.
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _problems_from(exc: ValidationError, file: Path, prefix: str = "") -> list[Located]:
    out = []
    for err in exc.errors():
        key = _key_path(tuple(err["loc"]))
        if prefix:
            key = f"{prefix}.{key}" if key else prefix
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Assertion failed, "):
            msg = msg[len("Assertion failed, ") :]
        out.append(Located(str(file), key, msg))
    return out


def _read_toml(path: Path) -> tuple[dict[str, Any] | None, list[Located]]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f), []
    except FileNotFoundError:
        return None, [Located(str(path), "", "no such file")]
    except PermissionError:
        return None, [Located(str(path), "", "permission denied")]
    except tomllib.TOMLDecodeError as exc:
        return None, [Located(str(path), "", f"TOML syntax error: {exc}")]
    except UnicodeDecodeError as exc:
        # TOML is UTF-8; a binary file matched by the tenants pattern is a problem of
        # that file, not a traceback.
        return None, [Located(str(path), "", f"not UTF-8 text (byte {exc.start}): TOML is UTF-8")]
    except OSError as exc:
        return None, [Located(str(path), "", f"cannot read: {exc.strerror}")]


def load(config_path: str | Path) -> Config:
    """Load and validate everything; raise ``ConfigError`` with every problem found."""
    path = Path(config_path).resolve()
    problems: list[Located] = []
    raw, errs = _read_toml(path)
    if raw is None:
        raise ConfigError(errs)
    try:
        daemon_file = DaemonFile.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, path)) from None

    problems.extend(_identity_problems(daemon_file, path))
    tenants: list[TenantSpec] = []
    tenant_files: dict[str, Path] = {}
    # Names of tenant files that failed to load: an `after` naming one is not "unknown"
    # (that file's own problem is reported).
    unloaded: set[str] = set()
    pattern = daemon_file.daemon.tenants
    tenant_paths = (
        sorted(path.parent.glob(pattern))
        if not Path(pattern).is_absolute()
        else sorted(Path("/").glob(pattern.lstrip("/")))
    )
    for tpath in tenant_paths:
        traw, errs = _read_toml(tpath)
        problems.extend(errs)
        if traw is None:
            continue
        # A tenant is named after its file unless it says otherwise.
        traw.setdefault("name", tpath.stem)
        try:
            tenant = TenantSpec.model_validate(traw, context={"base_dir": tpath.parent})
        except ValidationError as exc:
            problems.extend(_problems_from(exc, tpath))
            unloaded.add(str(traw["name"]))
            continue
        if tenant.name in tenant_files:
            problems.append(
                Located(
                    str(tpath),
                    "name",
                    f"tenant {tenant.name!r} is already defined in {tenant_files[tenant.name]}",
                )
            )
            continue
        module_problems = _wasm_module_problems(tenant, tpath)
        if module_problems:
            problems.extend(module_problems)
            unloaded.add(tenant.name)
            continue
        tenants.append(tenant)
        tenant_files[tenant.name] = tpath

    for p in ordering.problems({t.name: t.after for t in tenants}, known=unloaded):
        problems.append(Located(str(tenant_files[p.tenant]), "after", p.reason))
    tree, tree_problems = ptree.build(daemon_file.partition, tenants)
    # Every part is validated above and of its field's type (the path resolved, the tree
    # built): nothing left for Config's validator, which is therefore never built.
    config = Config.model_construct(
        path=path,
        daemon=daemon_file.daemon,
        partitions=daemon_file.partition,
        tenants=tenants,
        tenant_files=tenant_files,
        tree=tree,
        control=daemon_file.control,
    )
    problems += [locate(config, p.partition, p.key, p.reason) for p in tree_problems]
    # Real-time keys that need the tree and the daemon file (config/realtime.py).
    for rp in rt.problems(daemon_file.daemon, tenants, tree):
        problems.append(Located(str(tenant_files[rp.tenant]), rp.key, rp.reason))
    rt.assign_rt_runtime(tenants, tree)
    # Who each worker runs as (config/identity.py): unknown users, root without allow_root.
    for name, key, reason in identity.problems(config):
        problems.append(Located(str(tenant_files[name]), key, reason))
    if problems:
        raise ConfigError(problems)
    return config


def _identity_problems(daemon_file: DaemonFile, path: Path) -> list[Located]:
    """User and group names that the system's user database does not know: a grant
    for a misspelt group would silently grant nothing."""
    out = []
    group = daemon_file.daemon.socket_group
    if group is not None and userdb.gid_of(group) is None:
        out.append(Located(str(path), "daemon.socket_group", f"no group named {group!r}"))
    for n, grant in enumerate(daemon_file.control.grant):
        for user in grant.uids:
            if userdb.uid_of(user) is None:
                key = f"control.grant[{n}].uids"
                out.append(Located(str(path), key, f"no user named {user!r}"))
        for g in grant.groups:
            if userdb.gid_of(g) is None:
                key = f"control.grant[{n}].groups"
                out.append(Located(str(path), key, f"no group named {g!r}"))
    return out


def locate(config: Config, partition: str, key: str, reason: str) -> Located:
    """Point a problem with a partition at the file that declares it: a tenant's own
    partition at its tenant file (keys as written there), any other at the daemon file."""
    file = config.file_for(partition)
    if file != config.path:
        return Located(str(file), key, reason)
    label = f"partition '{partition}'" if partition else "partition (root)"
    return Located(str(file), f"{label}.{key}", reason)


def _wasm_module_problems(tenant: TenantSpec, file: Path) -> list[Located]:
    """A wasm worker's module must exist and decode, so that a bad module is a config
    error naming the file rather than a worker that fails at every start."""
    out = []
    for i, worker in enumerate(tenant.worker):
        if not isinstance(worker, WasmWorker):
            continue
        key, module = f"worker[{i}].wasm", worker.wasm
        if not module.is_file():
            out.append(Located(str(file), key, f"{module}: no such module file"))
            continue
        # Imported here: loading a config without wasm workers never pays for wasmtime.
        from supervisord_qnx.wasm.validate import module_problem

        problem = module_problem(module)
        if problem is not None:
            out.append(Located(str(file), key, f"{module}: {problem}"))
    return out
