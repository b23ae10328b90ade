"""`kd-worker service install|uninstall|status`: run the worker for weeks under launchd (macOS) or
systemd (Linux). The plan comes from `kd_worker.ops.units` (pure); this module carries it out: the only
place `launchctl`/`systemctl`/`scutil` run. `--dry-run DIR` renders the files into DIR and prints the
commands instead of running them, so both managers can be checked on any machine.

Commands run by name from PATH (`_execute`, `machine_name`) and every wait uses the `Timer` given to
`apply`: tests run the real plans against recorded fakes of the tools (tests/fakes/) on a fake clock.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.parsers.expat import ExpatError

from jobs.errors import ConfigError
from jobs.publisher import write_bytes_atomic
from kd_worker.ops import runstate
from kd_worker.ops.units import (
    ACTIONS,
    MakeDir,
    Manager,
    Remove,
    Run,
    ShowLastStop,
    Step,
    WaitGone,
    Warn,
    Write,
    host_for,
    parse_env_file,
    plan,
    service_work_dir,
)
from kd_worker.settings import WorkerSettings

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


@dataclass(frozen=True)
class Timer:
    """The clock and the sleep of every wait (tests pass a fake pair that only counts)."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def apply(steps: list[Step], dry_run: Path | None = None, timer: Timer | None = None) -> int:
    """Carry out the steps, or with `dry_run` render the files into that directory and print the
    commands without running them. Returns the exit code."""
    if dry_run is not None:
        dry_run.mkdir(parents=True, exist_ok=True)
    timer = timer or Timer()
    code = 0
    for step in steps:
        line = ("[dry-run] " if dry_run is not None else "") + describe(step)
        print(line, file=sys.stderr if isinstance(step, Warn) else sys.stdout)
        if dry_run is not None:
            if isinstance(step, Write):
                _write(dry_run / step.path.name, step.text, step.mode)
            continue
        rc = _perform(step, timer)
        if rc and isinstance(step, WaitGone):
            print(
                f"kd-worker service: `{shlex.join(step.probe)}` still finds the service after "
                f"{step.timeout_s:g} s; check it (and its process) and run the command again",
                file=sys.stderr,
            )
            return rc
        if rc and isinstance(step, Run):
            if step.on_error == "stop":
                print(f"kd-worker service: `{shlex.join(step.argv)}` failed with exit code {rc}", file=sys.stderr)
                return rc
            if step.on_error == "report":
                code = code or rc
            else:
                print(f"  (exit code {rc}: ignored, it was not loaded)")
    return code


def describe(step: Step) -> str:
    if isinstance(step, Write):
        return f"write {step.path} (mode {step.mode:o})"
    if isinstance(step, MakeDir):
        return f"mkdir -p {step.path}"
    if isinstance(step, Remove):
        return f"rm -f {step.path}"
    if isinstance(step, Run):
        return f"$ {shlex.join(step.argv)}"
    if isinstance(step, WaitGone):
        return (
            f"wait until `{shlex.join(step.probe)}` fails (the old instance has exited; at most {step.timeout_s:g} s)"
        )
    if isinstance(step, ShowLastStop):
        return f"last stop of the worker (from its work dir, see {step.service_file}):"
    if isinstance(step, Warn):
        return f"warning: {step.text}"
    return f"note: {step.text}"


def _perform(step: Step, timer: Timer) -> int:
    if isinstance(step, Write):
        _write(step.path, step.text, step.mode)
    elif isinstance(step, MakeDir):
        step.path.mkdir(parents=True, exist_ok=True)
    elif isinstance(step, Remove):
        step.path.unlink(missing_ok=True)
    elif isinstance(step, Run):
        return _run_with_retries(step, timer)
    elif isinstance(step, WaitGone):
        return _wait_gone(step, timer)
    elif isinstance(step, ShowLastStop):
        print("  " + _last_stop(step))
    return 0


def _run_with_retries(step: Run, timer: Timer) -> int:
    """Run the command; while it fails with one of `retry_codes`, retry after 0.5, 1, 2, 4, 8, 8, ... s
    until `retry_for_s` is spent."""
    deadline, delay = timer.clock() + step.retry_for_s, 0.5
    while True:
        rc = _execute(step.argv, quiet=step.on_error == "ignore")
        if rc not in step.retry_codes or timer.clock() + delay > deadline:
            return rc
        print(f"  (exit code {rc}: launchd is still busy with it; again in {delay:g} s)")
        timer.sleep(delay)
        delay = min(delay * 2, 8.0)


def _wait_gone(step: WaitGone, timer: Timer) -> int:
    """0 once the probe fails (the service is gone); 1 if it still succeeds after `timeout_s`."""
    deadline = timer.clock() + step.timeout_s
    while _execute(step.probe, quiet=True) == 0:
        if timer.clock() >= deadline:
            return 1
        timer.sleep(step.poll_s)
    return 0


def _last_stop(step: ShowLastStop) -> str:
    work_dir = service_work_dir(_installed_env(step.service_file), step.default_work_dir)
    entry = runstate.read(work_dir)
    if entry is None:
        return f"no record in {runstate.state_path(work_dir)} (the worker has not run there yet)"
    text = runstate.describe(entry)
    if entry.get("state") == runstate.CONFIG_ERROR:
        text += f"; fix it, then start it: {step.start_hint}"
    return text


def _installed_env(service_file: Path) -> dict[str, str]:
    """The environment an installed plist or EnvironmentFile gives the worker ({} if none is readable)."""
    try:
        data = service_file.read_bytes()
    except OSError:
        return {}
    if service_file.suffix == ".plist":
        try:
            env = plistlib.loads(data).get("EnvironmentVariables", {})
        except (ExpatError, ValueError, AttributeError):
            return {}
        return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}
    return parse_env_file(data.decode("utf-8", errors="replace"))


def _write(path: Path, text: str, mode: int) -> None:
    # A plist/env file may hold the Redis password: created with its final mode, then swapped in.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def _execute(argv: tuple[str, ...], quiet: bool) -> int:
    """The only place a service-manager command runs; dry runs never reach it."""
    if shutil.which(argv[0]) is None:
        raise ConfigError(
            f"{argv[0]} not found: this machine does not run that service manager; "
            "use --dry-run DIR (and --manager) to render the files only"
        )
    return subprocess.run(list(argv), capture_output=quiet, check=False).returncode


def machine_name(platform: str = sys.platform, machine_id_files: tuple[Path, ...] = MACHINE_ID_FILES) -> str:
    """A name for this machine that survives network changes: macOS's LocalHostName (the plain hostname
    follows the network there), else the first 12 hex digits of the machine id (machine-id(5))."""
    name = _local_host_name() if platform == "darwin" else _machine_id(machine_id_files)[:12]
    if not name or len(name) > 90 or any(c.isspace() for c in name):
        raise ConfigError(f"machine name {name!r} cannot be a worker name; {_SET_NAME}")
    return name


_SET_NAME = "set KD_WORKER_NAME=kd@NAME and install again"


def _local_host_name() -> str:
    try:
        out = subprocess.run(["scutil", "--get", "LocalHostName"], capture_output=True, text=True, check=False)
    except OSError as e:
        raise ConfigError(f"cannot run scutil ({e}); {_SET_NAME}") from e
    if out.returncode != 0:
        raise ConfigError(
            f"`scutil --get LocalHostName` failed ({(out.stderr or out.stdout).strip() or out.returncode}): set "
            f"a Local Hostname (System Settings > General > Sharing), or {_SET_NAME}"
        )
    return out.stdout.strip()


def _machine_id(files: tuple[Path, ...]) -> str:
    for path in files:
        if text := _read_id(path):
            return text
    raise ConfigError(f"no machine id in {' or '.join(map(str, files))}; {_SET_NAME}")


def _read_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def pin_worker_name(settings: WorkerSettings, name: Callable[[], str] | None = None) -> WorkerSettings:
    """The installed service carries a stable KD_WORKER_NAME (recovery of orphaned jobs keys on it), unless
    the installing shell set one. `name` defaults to `machine_name`."""
    if "worker_name" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"worker_name": f"kd@{(name or machine_name)()}"})


def run_service(
    action: str,
    settings: WorkerSettings,
    *,
    dry_run: Path | None = None,
    system: bool = False,
    with_redis: bool = False,
    manager: Manager | None = None,
) -> int:
    """`kd-worker service ACTION`: plan, then apply (or print, with dry_run). Returns the exit code."""
    host = host_for(manager, system)
    if host.system and dry_run is None and os.geteuid() != 0:
        raise ConfigError(
            "--system writes to /etc/systemd/system: run it as root "
            "(sudo -E keeps the KD_* settings the unit should carry)"
        )
    if action == "install":
        settings = pin_worker_name(settings)
    return apply(plan(action, host, settings, with_redis), dry_run)


def cmd_service(args: argparse.Namespace, settings: WorkerSettings, blas: object = None) -> int:
    return run_service(
        args.action, settings, dry_run=args.dry_run, system=args.system, with_redis=args.redis, manager=args.manager
    )


def add_service_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kd-worker service` on the CLI's subparsers (dispatches through `cmd_service`)."""
    s = subparsers.add_parser(
        "service", help="install/uninstall/show the worker as a launchd agent (macOS) or systemd unit (Linux)"
    )
    s.add_argument(
        "action",
        choices=ACTIONS,
        help="install (pins KD_WORKER_NAME to this machine unless set; replaces a running copy), uninstall "
        "(the worker exits before its Redis stops), status (the manager's view and why the worker last stopped)",
    )
    s.add_argument(
        "--dry-run", metavar="DIR", type=Path, help="render the files into DIR and print the commands; change nothing"
    )
    s.add_argument("--system", action="store_true", help="systemd: a system unit (as root) instead of a user unit")
    s.add_argument(
        "--redis",
        action="store_true",
        help="also manage a Redis running launchd/redis.conf (kd-redis agent or user unit)",
    )
    s.add_argument(
        "--manager",
        choices=("launchd", "systemd"),
        help="default: launchd on macOS, systemd elsewhere (render the other with --dry-run)",
    )
    s.set_defaults(func=cmd_service)
