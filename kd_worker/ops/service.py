"""`kd-worker service install|uninstall|status`: run the worker for weeks under launchd (macOS) or
systemd (Linux). The plan comes from `kd_worker.ops.units` (pure); this module carries it out: the only
place `launchctl`/`systemctl` run. `--dry-run DIR` renders the files into DIR and prints the commands
instead of running them, so both managers can be checked on any machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.errors import ConfigError
from jobs.publisher import write_bytes_atomic
from kd_worker.ops.units import ACTIONS, MakeDir, Manager, Remove, Run, Step, Write, host_for, plan
from kd_worker.settings import WorkerSettings


def apply(steps: list[Step], dry_run: Path | None = None) -> int:
    """Carry out the steps, or with `dry_run` render the files into that directory and print the
    commands without running them. Returns the exit code."""
    if dry_run is not None:
        dry_run.mkdir(parents=True, exist_ok=True)
    code = 0
    for step in steps:
        print(("[dry-run] " if dry_run is not None else "") + describe(step))
        if dry_run is not None:
            if isinstance(step, Write):
                _write(dry_run / step.path.name, step.text, step.mode)
            continue
        rc = _perform(step)
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
    return f"note: {step.text}"


def _perform(step: Step) -> int:
    if isinstance(step, Write):
        _write(step.path, step.text, step.mode)
    elif isinstance(step, MakeDir):
        step.path.mkdir(parents=True, exist_ok=True)
    elif isinstance(step, Remove):
        step.path.unlink(missing_ok=True)
    elif isinstance(step, Run):
        return _execute(step.argv, quiet=step.on_error == "ignore")
    return 0


def _write(path: Path, text: str, mode: int) -> None:
    # A plist/env file may hold the Redis password: created with its final mode, then swapped in.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def _execute(argv: tuple[str, ...], quiet: bool) -> int:
    """The only place a command runs; dry runs never reach it."""
    if shutil.which(argv[0]) is None:
        raise ConfigError(
            f"{argv[0]} not found: this machine does not run that service manager; "
            "use --dry-run DIR (and --manager) to render the files only"
        )
    return subprocess.run(list(argv), capture_output=quiet, check=False).returncode


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
    s.add_argument("action", choices=ACTIONS)
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
