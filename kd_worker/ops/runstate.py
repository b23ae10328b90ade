"""Why the worker last stopped: a small JSON file in its work dir, written by `kd-worker run` when it
starts and when it exits, and printed by `kd-worker service status`.

A service manager only keeps an exit code. This file keeps the reason, so an agent that stopped on a
configuration error (and stays down: see `kd_worker.ops.units.LAUNCHD_CONFIG_EXIT`) says why.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from jobs.publisher import write_json_atomic

log = structlog.get_logger(__name__)

STATE_NAME = "worker-state.json"
RUNNING, STOPPED, FAILED, CONFIG_ERROR = "running", "stopped", "failed", "config_error"
STATES = (RUNNING, STOPPED, FAILED, CONFIG_ERROR)


def state_path(work_dir: Path) -> Path:
    return work_dir / STATE_NAME


def record(work_dir: Path, state: str, reason: str, exit_code: int | None = None) -> None:
    """Replace the record atomically. Failing to write it (an unwritable work dir is itself a configuration
    error) is logged, never raised: it must not change how the worker exits."""
    entry = {
        "state": state,
        "reason": reason,
        "exit_code": exit_code,
        "pid": os.getpid(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_path(work_dir), entry)
    except OSError as e:
        log.warning("run_state_not_written", path=str(state_path(work_dir)), error=str(e))


def read(work_dir: Path) -> dict[str, Any] | None:
    """The record, or None when there is none (or it is not a record)."""
    try:
        entry = json.loads(state_path(work_dir).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("state") in STATES else None


def describe(entry: dict[str, Any]) -> str:
    state, at, pid = str(entry.get("state")), entry.get("at"), entry.get("pid")
    if state == RUNNING:
        return f"started at {at} (pid {pid}); no exit recorded since (running, or killed without a chance to say)"
    code = entry.get("exit_code")
    what = {STOPPED: "stopped", FAILED: "failed", CONFIG_ERROR: "stopped on a configuration error"}.get(state, state)
    return f"{what} at {at} (pid {pid}, exit code {code}): {entry.get('reason')}"
