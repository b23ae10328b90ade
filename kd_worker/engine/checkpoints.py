"""Training checkpoints of one run, under the worker's work directory (never in adapters_kd/,
which only the publisher writes). One directory per step: state.safetensors (adapter weights +
Adam state) and state.json (step, metrics history), written to a temp dir and renamed."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from jobs.durable import fsync_tree


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
        return sorted(int(p.name[5:]) for p in self.root.glob("step_*") if (p / "state.json").is_file())

    def save(self, step: int, arrays: dict[str, mx.array], state: dict[str, Any]) -> None:
        final = self._dir(step)
        stage = self.root / f".step_{step:07d}.{os.getpid()}.tmp"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        save_adapter_file(stage / "state.safetensors", arrays)
        (stage / "state.json").write_text(json.dumps(state))
        fsync_tree(stage)  # on disk before the name points at it (F_FULLFSYNC on darwin)
        shutil.rmtree(final, ignore_errors=True)
        stage.rename(final)

    def load(self, step: int) -> tuple[dict[str, mx.array], dict[str, Any]]:
        d = self._dir(step)
        return load_arrays(d / "state.safetensors"), json.loads((d / "state.json").read_text())

    def latest(self) -> tuple[int, dict[str, mx.array], dict[str, Any]] | None:
        steps = self.steps()
        if not steps:
            return None
        arrays, state = self.load(steps[-1])
        return steps[-1], arrays, state

    def adapter(self, step: int) -> dict[str, mx.array]:
        """The adapter weights alone (mlx-lm names) of a saved step."""
        arrays, _ = self.load(step)
        return {k[8:]: v for k, v in arrays.items() if k.startswith("adapter.")}
