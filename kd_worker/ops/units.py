"""The service's files and plans, pure: rendering launchd plists, systemd units and the env file from the
templates in `launchd/`, and planning each action as a list of steps. Nothing here runs a command or
writes a file (`kd_worker.ops.service` does).

Service files are rendered from the templates in the checkout's `launchd/` directory with the real
paths (this virtualenv's `kd-worker`, the checkout as working directory, the log directory) and the
KD_* settings of the installing shell. Each action is planned as a list of steps (write a file,
remove one, run a command) before anything happens; `--dry-run DIR` renders the files into DIR and
prints the commands instead of running them, so both managers can be checked on any machine.
"""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from jobs.errors import ConfigError
from kd_worker.settings import WorkerSettings

ACTIONS = ("install", "uninstall", "status")
LABEL, REDIS_LABEL = "com.conch.kd-worker", "com.conch.kd-redis"
UNIT, REDIS_UNIT = "kd-worker.service", "kd-redis.service"
SYSTEM_REDIS_UNIT = "redis-server.service"  # Debian/Ubuntu's name for the distribution's Redis
THROTTLE_S = 15  # launchd ThrottleInterval / systemd RestartSec: the spacing of restarts
REDIS_STOP_S = 30  # SIGTERM -> SIGKILL for Redis: time to flush the AOF
REPO = Path(__file__).resolve().parents[2]  # kd-daemon runs from a clone (editable install)
TEMPLATES = REPO / "launchd"

Manager = Literal["launchd", "systemd"]


@dataclass(frozen=True)
class Write:
    path: Path
    text: str
    mode: int = 0o644


@dataclass(frozen=True)
class MakeDir:
    path: Path


@dataclass(frozen=True)
class Remove:
    path: Path


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    # "stop": abort the plan on failure; "ignore": the goal already holds (bootout of an agent that is
    # not loaded); "report": go on, but the exit code says it (status).
    on_error: Literal["stop", "ignore", "report"] = "stop"


@dataclass(frozen=True)
class Note:
    text: str


Step = Write | MakeDir | Remove | Run | Note


@dataclass(frozen=True)
class Host:
    """Where the service goes on this machine; built once by `host_for`."""

    manager: Manager
    system: bool  # systemd system unit (root) instead of a user unit
    repo: Path
    kd_worker: Path
    home: Path
    uid: int
    redis_server: Path | None

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def agents_dir(self) -> Path:
        return self.home / "Library" / "LaunchAgents"

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / "kd-daemon"

    @property
    def redis_data(self) -> Path:
        if self.manager == "launchd":
            return self.home / "Library" / "Application Support" / "kd-daemon" / "redis"
        return self.home / ".local" / "share" / "kd-daemon" / "redis"

    @property
    def unit_dir(self) -> Path:
        return Path("/etc/systemd/system") if self.system else self.home / ".config" / "systemd" / "user"

    @property
    def env_file(self) -> Path:
        return (
            Path("/etc/kd-daemon/kd-worker.env")
            if self.system
            else self.home / ".config" / "kd-daemon" / "kd-worker.env"
        )

    def systemctl(self, *args: str) -> tuple[str, ...]:
        return ("systemctl", *args) if self.system else ("systemctl", "--user", *args)


def host_for(
    manager: Manager | None = None, system: bool = False, kd_worker: Path | None = None, home: Path | None = None
) -> Host:
    """This machine's Host: launchd on macOS, systemd elsewhere, unless `manager` says otherwise."""
    manager = manager or ("launchd" if sys.platform == "darwin" else "systemd")
    if system and manager == "launchd":
        raise ConfigError(
            "--system is for systemd: on macOS kd-worker installs as a LaunchAgent of the "
            "logged-in user (gui domain); drop --system"
        )
    if not TEMPLATES.is_dir():
        raise ConfigError(
            f"service templates not found in {TEMPLATES}: `kd-worker service` runs from a clone "
            "of kd-daemon installed with `pip install -e .`"
        )
    exe = kd_worker or Path(sys.executable).parent / "kd-worker"  # the venv's bin dir, symlinks kept
    if not exe.is_file():
        raise ConfigError(
            f"{exe} does not exist: install kd-daemon into this virtualenv (`pip install -e .`) "
            "and run `kd-worker service` from it"
        )
    redis = shutil.which("redis-server")
    return Host(manager, system, REPO, exe, home or Path.home(), os.getuid(), Path(redis) if redis else None)


def service_env(settings: WorkerSettings) -> dict[str, str]:
    """The service's environment: each KD_* setting this process was given (relative paths made
    absolute: the service starts elsewhere), plus JSON logs and unbuffered output."""
    env: dict[str, str] = {}
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Path):
            text = str(value.absolute())
        elif isinstance(value, (dict, list)):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"KD_{name.upper()}"] = text
    env.update(KD_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    for key, text in env.items():
        if "\n" in text or "\r" in text or "\0" in text:
            raise ConfigError(f"{key} contains a line break or NUL, which a service file cannot carry")
    return env


def _fill(name: str, **values: object) -> str:
    path = TEMPLATES / name
    try:
        return Template(path.read_text()).substitute(values)
    except OSError as e:
        raise ConfigError(f"cannot read the service template {path}: {e.strerror}") from e
    except (KeyError, ValueError) as e:
        raise ConfigError(f"service template {path} does not match kd_worker/ops/units.py: {e!r}") from e


def _x(value: object) -> str:
    return escape(str(value))


def _checked_plist(text: str, name: str) -> str:
    # A broken template must fail here, not silently inside launchd.
    try:
        plistlib.loads(text.encode())
    except (ExpatError, ValueError) as e:  # malformed XML / not a property list
        raise ConfigError(f"rendered {name} is not a valid property list ({e}); fix launchd/{name}.in") from e
    return text


def render_worker_plist(host: Host, settings: WorkerSettings) -> str:
    env = "\n".join(
        f"        <key>{_x(k)}</key>\n        <string>{_x(v)}</string>" for k, v in service_env(settings).items()
    )
    text = _fill(
        f"{LABEL}.plist.in",
        label=LABEL,
        kd_worker=_x(host.kd_worker),
        repo=_x(host.repo),
        environment=env,
        throttle=THROTTLE_S,
        grace=settings.shutdown_grace,
        log_dir=_x(host.log_dir),
    )
    return _checked_plist(text, f"{LABEL}.plist")


def render_redis_plist(host: Host) -> str:
    text = _fill(
        f"{REDIS_LABEL}.plist.in",
        label=REDIS_LABEL,
        redis_server=_x(_redis_server(host)),
        redis_conf=_x(TEMPLATES / "redis.conf"),
        data_dir=_x(host.redis_data),
        throttle=THROTTLE_S,
        stop_timeout=REDIS_STOP_S,
        log_dir=_x(host.log_dir),
    )
    return _checked_plist(text, f"{REDIS_LABEL}.plist")


def _redis_server(host: Host) -> Path:
    if host.redis_server is None:
        raise ConfigError(
            "redis-server not found on PATH: `brew install redis` (macOS) or "
            "`apt-get install redis-server` (Debian/Ubuntu)"
        )
    return host.redis_server


def _unit_value(value: object) -> str:
    """A value in a unit file: '%' starts a specifier, so it is doubled."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{text!r} contains a line break, which a unit file cannot carry")
    return text.replace("%", "%%")


def _exec_line(argv: list[object]) -> str:
    """An ExecStart= value: specifiers escaped, $VAR expansion escaped (systemd never expands the program
    path itself), words quoted if they hold blanks or quotes."""
    words = []
    for i, value in enumerate(argv):
        text = _unit_value(value) if i == 0 else _unit_value(value).replace("$", "$$")
        if any(c.isspace() or c in "\"'\\;" for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(text)
    return " ".join(words)


def _docs(host: Host) -> str:
    return _unit_value((host.repo / "launchd" / "README.md").as_uri())


def render_worker_unit(host: Host, settings: WorkerSettings, with_redis: bool) -> str:
    if host.system:
        ordering = f"After={SYSTEM_REDIS_UNIT}\nWants={SYSTEM_REDIS_UNIT}"
        run_as = f"User={_unit_value(_owner(host.repo))}"
    elif with_redis:
        ordering = f"After={REDIS_UNIT}\nWants={REDIS_UNIT}"
        run_as = "# A user unit runs as the user whose manager runs it."
    else:
        ordering = (
            "# A user unit cannot be ordered after the system's redis-server.service; the worker waits\n"
            "# for Redis at start-up instead (--redis adds a user-level Redis to order after)."
        )
        run_as = "# A user unit runs as the user whose manager runs it."
    return _fill(
        "kd-worker.service.in",
        docs=_docs(host),
        redis_ordering=ordering,
        run_as=run_as,
        repo=_unit_value(host.repo),
        env_file=_unit_value(host.env_file),
        exec_start=_exec_line([host.kd_worker, "run"]),
        throttle=THROTTLE_S,
        grace=settings.shutdown_grace,
        wanted_by="multi-user.target" if host.system else "default.target",
    )


def render_redis_unit(host: Host) -> str:
    argv = [
        _redis_server(host),
        TEMPLATES / "redis.conf",
        "--dir",
        host.redis_data,
        "--supervised",
        "systemd",
        "--daemonize",
        "no",
    ]
    return _fill(
        "kd-redis.service.in",
        docs=_docs(host),
        exec_start=_exec_line(argv),
        throttle=THROTTLE_S,
        stop_timeout=REDIS_STOP_S,
        wanted_by="default.target",
    )


def render_env_file(settings: WorkerSettings) -> str:
    """systemd EnvironmentFile: double-quoted values with the POSIX-shell escapes systemd documents."""
    lines = ["# Written by `kd-worker service install` (mode 0600: KD_REDIS_URL may hold a password)."]
    for key, value in service_env(settings).items():
        quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
        lines.append(f'{key}="{quoted}"')
    return "\n".join(lines) + "\n"


def _owner(path: Path) -> str:
    try:
        return path.owner()
    except (KeyError, OSError) as e:
        raise ConfigError(f"cannot tell who owns {path} (the user a system unit runs as): {e}") from e


def plan(action: str, host: Host, settings: WorkerSettings, with_redis: bool = False) -> list[Step]:
    """The steps of `action` on `host`; nothing is touched until `apply`."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown service action {action!r}: use one of {', '.join(ACTIONS)}")
    if host.manager == "launchd":
        return _plan_launchd(action, host, settings, with_redis)
    if host.system and with_redis:
        raise ConfigError(
            "--redis manages a user-level Redis; with --system use the distribution's "
            f"{SYSTEM_REDIS_UNIT} with launchd/redis.conf included (see launchd/README.md)"
        )
    return _plan_systemd(action, host, settings, with_redis)


def _plan_launchd(action: str, host: Host, settings: WorkerSettings, with_redis: bool) -> list[Step]:
    agents = [(LABEL, host.agents_dir / f"{LABEL}.plist")]
    if with_redis:
        agents.append((REDIS_LABEL, host.agents_dir / f"{REDIS_LABEL}.plist"))
    if action == "status":
        return [
            s
            for label, path in agents
            for s in (
                Note(f"{path}: {'present' if path.exists() else 'missing'}"),
                Run(("launchctl", "print", f"{host.domain}/{label}"), on_error="report"),
            )
        ]
    if action == "uninstall":  # the worker first: it stops (checkpointing) before its Redis goes
        steps: list[Step] = [
            s
            for label, path in agents
            for s in (Run(("launchctl", "bootout", f"{host.domain}/{label}"), on_error="ignore"), Remove(path))
        ]
        return steps + [
            Note(
                f"kept the logs in {host.log_dir}" + (f" and the Redis data in {host.redis_data}" if with_redis else "")
            )
        ]
    worker_plist = agents[0][1]
    steps = [MakeDir(host.log_dir), Run(("launchctl", "bootout", f"{host.domain}/{LABEL}"), on_error="ignore")]
    if with_redis:
        redis_plist = agents[1][1]
        steps += [
            MakeDir(host.redis_data),
            Write(redis_plist, render_redis_plist(host)),
            Run(("launchctl", "bootout", f"{host.domain}/{REDIS_LABEL}"), on_error="ignore"),
            *_bootstrap(host, REDIS_LABEL, redis_plist),
        ]
    steps += [Write(worker_plist, render_worker_plist(host, settings), 0o600), *_bootstrap(host, LABEL, worker_plist)]
    target = f"{host.domain}/{LABEL}"
    return steps + [
        Note(
            f"logs: {host.log_dir}/kd-worker.err.log (JSON lines); stop (checkpoint, stays down): "
            f"launchctl kill SIGTERM {target}; start: launchctl kickstart {target}"
        )
    ]


def _bootstrap(host: Host, label: str, plist: Path) -> list[Step]:
    # `enable` first: a service disabled earlier (launchctl disable) refuses to bootstrap.
    return [
        Run(("launchctl", "enable", f"{host.domain}/{label}")),
        Run(("launchctl", "bootstrap", host.domain, str(plist))),
    ]


def _plan_systemd(action: str, host: Host, settings: WorkerSettings, with_redis: bool) -> list[Step]:
    units = [UNIT, REDIS_UNIT] if with_redis else [UNIT]
    if action == "status":
        return [
            s
            for unit in units
            for s in (
                Note(f"{host.unit_dir / unit}: {'present' if (host.unit_dir / unit).exists() else 'missing'}"),
                Run(host.systemctl("status", "--no-pager", unit), on_error="report"),
            )
        ]
    if action == "uninstall":
        steps: list[Step] = [Run(host.systemctl("disable", "--now", unit), on_error="ignore") for unit in units]
        steps += [Remove(host.unit_dir / unit) for unit in units] + [Remove(host.env_file)]
        return steps + [Run(host.systemctl("daemon-reload"))]
    steps = [
        Write(host.env_file, render_env_file(settings), 0o600),
        Write(host.unit_dir / UNIT, render_worker_unit(host, settings, with_redis)),
    ]
    if with_redis:
        steps += [MakeDir(host.redis_data), Write(host.unit_dir / REDIS_UNIT, render_redis_unit(host))]
    steps.append(Run(host.systemctl("daemon-reload")))
    if with_redis:
        steps.append(Run(host.systemctl("enable", "--now", REDIS_UNIT)))
    # restart, not `enable --now`: a reinstall must pick up the new unit and settings.
    steps += [Run(host.systemctl("enable", UNIT)), Run(host.systemctl("restart", UNIT))]
    scope = "" if host.system else "--user "
    steps.append(
        Note(f"logs: journalctl {scope}-u {UNIT} -f; stop (checkpoint, stays down): systemctl {scope}stop {UNIT}")
    )
    if not host.system:
        steps.append(Note("user units stop at logout unless lingering is on: loginctl enable-linger $USER"))
    return steps
