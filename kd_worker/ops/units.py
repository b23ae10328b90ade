"""The service's files and plans, pure: rendering launchd plists, systemd units and the env file from the
templates in `launchd/`, and planning each action as a list of steps. Nothing here runs a command or
writes a file (`kd_worker.ops.service` does).

Service files are rendered from the templates in the checkout's `launchd/` directory with the real
paths (this virtualenv's `kd-worker`, the checkout as working directory, the log directory) and the
KD_* settings of the installing shell. Each action is planned as a list of steps (write a file,
remove one, run a command, wait until launchd has let a service go) before anything happens;
`--dry-run DIR` renders the files into DIR and prints the commands instead of running them, so both
managers can be checked on any machine.

launchd's races are planned for here: `launchctl bootout` returns before the process has exited, and
a `bootstrap` of the label meanwhile fails with 5 (Input/output error) or 37 (Operation already in
progress). So every bootout is followed by a wait until `launchctl print` no longer finds the service
(bounded by ExitTimeOut + 10 s: launchd SIGKILLs at ExitTimeOut), and bootstrap is retried on 5 and 37
with a bounded backoff.
"""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from jobs.errors import ConfigError
from kd_worker.settings import WorkerSettings, default_work_dir

ACTIONS = ("install", "uninstall", "status")
LABEL, REDIS_LABEL = "com.conch.kd-worker", "com.conch.kd-redis"
UNIT, REDIS_UNIT = "kd-worker.service", "kd-redis.service"
SYSTEM_REDIS_UNIT = "redis-server.service"  # Debian/Ubuntu's name for the distribution's Redis
THROTTLE_S = 15  # launchd ThrottleInterval / systemd RestartSec: the spacing of restarts
REDIS_STOP_S = 30  # SIGTERM -> SIGKILL for Redis: time to flush the AOF
# launchd restarts every non-zero exit (KeepAlive {SuccessfulExit: false}) and, unlike systemd's
# RestartPreventExitStatus=78, cannot exempt one: the agent runs `kd-worker run --config-error-exit 0`, so a
# configuration error (recorded in the work dir for `service status`) leaves it down instead of reloading the
# teacher every ThrottleInterval. KeepAlive's other conditions (PathState, ...) are ORed with SuccessfulExit
# (launchd.plist(5)), so none of them can veto that restart.
LAUNCHD_CONFIG_EXIT = 0
GONE_MARGIN_S = 10  # after ExitTimeOut launchd has SIGKILLed the process; this much more for its clean-up
BOOTSTRAP_RETRY_S = 30  # how long a bootstrap refused with 5/37 (launchd still busy with the label) is retried
BOOTSTRAP_BUSY = (5, 37)  # "Input/output error", "Operation already in progress"
# launchd agents get "Operation not permitted" in these (macOS privacy protection, TCC) unless the
# program has Full Disk Access.
TCC_HOME_DIRS = ("Desktop", "Documents", "Downloads")
TCC_ROOTS = (Path("/Volumes"),)
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
    # Exit codes that mean "busy, try again" (launchd still letting the old instance go), retried with a
    # doubling delay for at most `retry_for_s` seconds.
    retry_codes: tuple[int, ...] = ()
    retry_for_s: float = 0.0


@dataclass(frozen=True)
class WaitGone:
    """Poll `probe` until it fails (the service has left launchd), at most `timeout_s`; the plan stops if
    it is still there then."""

    probe: tuple[str, ...]
    timeout_s: float
    poll_s: float = 0.5


@dataclass(frozen=True)
class ShowLastStop:
    """Print why the worker last stopped (kd_worker.ops.runstate), read from the work dir the installed
    service uses: KD_WORK_DIR in `service_file` (plist or EnvironmentFile), else `default_work_dir`."""

    service_file: Path
    default_work_dir: Path
    start_hint: str


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Warn:
    text: str


Step = Write | MakeDir | Remove | Run | WaitGone | ShowLastStop | Note | Warn


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

    def target(self, label: str) -> str:
        return f"{self.domain}/{label}"


def host_for(
    manager: Manager | None = None,
    system: bool = False,
    kd_worker: Path | None = None,
    home: Path | None = None,
    uid: int | None = None,
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
    uid = os.getuid() if uid is None else uid
    return Host(manager, system, REPO, exe, home or Path.home(), uid, Path(redis) if redis else None)


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
        config_exit=LAUNCHD_CONFIG_EXIT,
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
    worker_plist = agents[0][1]
    if action == "status":
        steps: list[Step] = [
            s
            for label, path in agents
            for s in (
                Note(f"{path}: {'present' if path.exists() else 'missing'}"),
                Run(("launchctl", "print", host.target(label)), on_error="report"),
            )
        ]
        hint = f"launchctl kickstart {host.target(LABEL)} (or reinstall)"
        return steps + [ShowLastStop(worker_plist, default_work_dir(host.home), hint)]
    worker_grace = max(settings.shutdown_grace, installed_exit_timeout(worker_plist) or 0)
    if action == "uninstall":  # the worker first, gone (checkpointed) before its Redis stops
        steps = [*_bootout(host, LABEL, worker_grace), Remove(worker_plist)]
        if with_redis:
            steps += [*_bootout(host, REDIS_LABEL, REDIS_STOP_S), Remove(agents[1][1])]
        return steps + [
            Note(
                f"kept the logs in {host.log_dir}" + (f" and the Redis data in {host.redis_data}" if with_redis else "")
            )
        ]
    if host.uid == 0:
        raise ConfigError(
            "refusing to install a LaunchAgent as root: it would go to gui/0, a login session that never "
            "exists, and run as root; run `kd-worker service install` as the user who logs in (no sudo)"
        )
    steps = [*tcc_warnings(host, settings), MakeDir(host.log_dir), *_bootout(host, LABEL, worker_grace)]
    if with_redis:
        redis_plist = agents[1][1]
        steps += [
            MakeDir(host.redis_data),
            Write(redis_plist, render_redis_plist(host)),
            *_bootout(host, REDIS_LABEL, REDIS_STOP_S),
            *_bootstrap(host, REDIS_LABEL, redis_plist),
        ]
    steps += [Write(worker_plist, render_worker_plist(host, settings), 0o600), *_bootstrap(host, LABEL, worker_plist)]
    target = host.target(LABEL)
    return steps + [
        Note(
            f"logs: {host.log_dir}/kd-worker.err.log (JSON lines); stop (checkpoint, stays down): "
            f"launchctl kill SIGTERM {target}; start: launchctl kickstart {target}"
        )
    ]


def _bootout(host: Host, label: str, exit_timeout: int) -> list[Step]:
    # bootout returns before the process has exited (it has ExitTimeOut to checkpoint): wait until launchd
    # no longer knows the label, or a bootstrap now would race the old instance.
    return [
        Run(("launchctl", "bootout", host.target(label)), on_error="ignore"),
        WaitGone(("launchctl", "print", host.target(label)), timeout_s=exit_timeout + GONE_MARGIN_S),
    ]


def _bootstrap(host: Host, label: str, plist: Path) -> list[Step]:
    # `enable` first: a service disabled earlier (launchctl disable) refuses to bootstrap.
    return [
        Run(("launchctl", "enable", host.target(label))),
        Run(
            ("launchctl", "bootstrap", host.domain, str(plist)),
            retry_codes=BOOTSTRAP_BUSY,
            retry_for_s=BOOTSTRAP_RETRY_S,
        ),
    ]


def installed_exit_timeout(plist: Path) -> int | None:
    """ExitTimeOut of an installed agent (a reinstall waits for the old instance by the old rule)."""
    try:
        with open(plist, "rb") as f:
            value = plistlib.load(f).get("ExitTimeOut")
    except (OSError, ExpatError, ValueError, AttributeError):
        return None
    return value if type(value) is int and value > 0 else None


def tcc_warnings(host: Host, settings: WorkerSettings) -> list[Step]:
    """A Warn for every path the agent needs that macOS privacy protection (TCC) closes to launchd agents."""
    places = {
        "checkout": host.repo,
        "virtualenv": host.kd_worker.parent.parent,
        "KD_TEACHER": settings.teacher,
        "KD_STUDENT": settings.student,
        "KD_MODELS_ROOT": settings.models_root,
        "KD_ADAPTERS_DIR": settings.adapters_dir,
        "KD_WORK_DIR": settings.work_dir,
    }
    python = (host.kd_worker.parent / "python").resolve()
    return [
        Warn(
            f"{what} {path} is under {root}: a launchd agent gets 'Operation not permitted' there (macOS "
            f"privacy protection). Move it (e.g. under ~/kd-daemon or ~/Library/Application Support), or give "
            f"{python} Full Disk Access (System Settings > Privacy & Security), then reinstall"
        )
        for what, path in places.items()
        if path is not None and (root := tcc_root(path, host.home)) is not None
    ]


def tcc_root(path: Path, home: Path) -> Path | None:
    """The protected folder `path` lies in (as written or with its links resolved), or None."""
    roots = [home / d for d in TCC_HOME_DIRS] + list(TCC_ROOTS)
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        for root in roots:
            if candidate.is_relative_to(root) or candidate.is_relative_to(root.resolve()):
                return root
    return None


def parse_env_file(text: str) -> dict[str, str]:
    """The inverse of `render_env_file`: KEY="value" lines with its backslash escapes."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if line.startswith("#") or not sep or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            continue
        value, chars = [], iter(quoted[1:-1])
        for c in chars:
            value.append(next(chars, "") if c == "\\" else c)
        env[key] = "".join(value)
    return env


def service_work_dir(service_env: Mapping[str, str], default: Path) -> Path:
    """Where the installed worker writes (its KD_WORK_DIR, else the default for its user)."""
    value = service_env.get("KD_WORK_DIR")
    return Path(value).expanduser() if value else default


def _plan_systemd(action: str, host: Host, settings: WorkerSettings, with_redis: bool) -> list[Step]:
    units = [UNIT, REDIS_UNIT] if with_redis else [UNIT]
    if action == "status":
        steps: list[Step] = [
            s
            for unit in units
            for s in (
                Note(f"{host.unit_dir / unit}: {'present' if (host.unit_dir / unit).exists() else 'missing'}"),
                Run(host.systemctl("status", "--no-pager", unit), on_error="report"),
            )
        ]
        home = Path(os.path.expanduser(f"~{_owner(host.repo)}")) if host.system else host.home
        hint = f"{shlex.join(host.systemctl('restart', UNIT))} (or reinstall)"
        return steps + [ShowLastStop(host.env_file, default_work_dir(home), hint)]
    if action == "uninstall":
        steps = [Run(host.systemctl("disable", "--now", unit), on_error="ignore") for unit in units]
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
