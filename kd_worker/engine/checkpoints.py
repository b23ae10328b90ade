"""Training checkpoints of one run, under the worker's work directory (never in adapters_kd/,
which only the publisher writes). One directory per step: state.safetensors (adapter weights +
Adam state) and state.json (step, metrics history, the sha256 of state.safetensors), written to
a temp dir and renamed.

A checkpoint is verified before it is used: a truncated or damaged one (a crash or power loss
before the data reached the disk, bit rot) is dropped with a `checkpoint_unusable` warning and
the run resumes from the newest good one, or starts afresh; it never trains on garbage. Temp dirs
of a save killed half-way are removed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog

from jobs.durable import fsync_tree
from jobs.errors import KDError
from jobs.publisher import sha256_file

log = structlog.get_logger(__name__)

ARRAYS, STATE = "state.safetensors", "state.json"
SHA_KEY = "state_sha256"  # in state.json: the sha256 of state.safetensors as saved


class CheckpointUnusable(KDError):
    """A checkpoint is incomplete or damaged; the run falls back to an older one."""


def save_adapter_file(path: Path, arrays: dict[str, mx.array]) -> None:
    """mx.save_safetensors, with a failed write (full disk, file-size limit) raised as the OSError
    it is (mlx raises RuntimeError): a checkpoint or a publish then fails with a clear error."""
    try:
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    except RuntimeError as e:
        full = shutil.disk_usage(path.parent).free < sum(a.nbytes for a in arrays.values())
        raise OSError(errno.ENOSPC if full else errno.EIO, f"cannot write {path.name}: {e}") from e


def load_arrays(path: Path) -> dict[str, mx.array]:
    """The named arrays of a safetensors file (mx.load's one-file form)."""
    arrays = mx.load(str(path))
    if not isinstance(arrays, dict):
        raise OSError(errno.EINVAL, f"{path} holds no named arrays")
    return arrays


class DirCheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:07d}"

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("step_*") if (p / STATE).is_file())

    def save(self, step: int, arrays: dict[str, mx.array], state: dict[str, Any]) -> None:
        final = self._dir(step)
        stage = self.root / f".step_{step:07d}.{os.getpid()}.tmp"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        save_adapter_file(stage / "state.safetensors", arrays)
        state = {**state, SHA_KEY: sha256_file(stage / ARRAYS)}  # what load() verifies
        (stage / "state.json").write_text(json.dumps(state))
        fsync_tree(stage)  # on disk before the name points at it (F_FULLFSYNC on darwin)
        shutil.rmtree(final, ignore_errors=True)
        stage.rename(final)

    def verified_state(self, step: int) -> dict[str, Any]:
        """state.json of a saved step, after checking state.safetensors against its sha256;
        CheckpointUnusable says what is wrong. Checkpoints saved without a sha256 pass unchecked."""
        d = self._dir(step)
        try:
            state = json.loads((d / STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointUnusable(f"{d / STATE} is unreadable: {e}") from e
        if not isinstance(state, dict) or state.get("step") != step:
            raise CheckpointUnusable(f"{d / STATE} is not the state of step {step}")
        want = state.pop(SHA_KEY, None)
        try:
            got = sha256_file(d / ARRAYS) if want is not None else None
        except OSError as e:
            raise CheckpointUnusable(f"{d / ARRAYS} is unreadable: {e}") from e
        if got != want:
            raise CheckpointUnusable(f"{d / ARRAYS} has sha256 {got}, not the {want} it was saved with")
        return state

    def load(self, step: int) -> tuple[dict[str, mx.array], dict[str, Any]]:
        state = self.verified_state(step)
        try:
            return load_arrays(self._dir(step) / ARRAYS), state
        except (OSError, RuntimeError, ValueError) as e:  # mlx raises RuntimeError for a bad file
            raise CheckpointUnusable(f"{self._dir(step) / ARRAYS} cannot be read: {e}") from e

    def latest(self) -> tuple[int, dict[str, mx.array], dict[str, Any]] | None:
        """The newest good checkpoint (None: start afresh). Unusable checkpoints are dropped with a
        warning, older ones too (they are published with the adapter), and half-saved temp dirs removed."""
        for stage in self.root.glob(".step_*.tmp"):
            shutil.rmtree(stage, ignore_errors=True)
        found: tuple[int, dict[str, mx.array], dict[str, Any]] | None = None
        for step in reversed(self.steps()):
            try:
                if found is None:
                    arrays, state = self.load(step)
                    found = step, arrays, state
                else:
                    self.verified_state(step)
            except CheckpointUnusable as e:
                log.warning("checkpoint_unusable", step=step, reason=str(e))
                shutil.rmtree(self._dir(step), ignore_errors=True)
        return found

    def adapter(self, step: int) -> dict[str, mx.array]:
        """The adapter weights alone (mlx-lm names) of a saved step."""
        arrays, _ = self.load(step)
        return {k[8:]: v for k, v in arrays.items() if k.startswith("adapter.")}
