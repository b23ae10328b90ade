"""Content-addressed cache of teacher work, so reruns, retries and resumed jobs reuse it.

Two levels, one safetensors file per example each:
  responses/  what the teacher generated for a prompt; keyed by teacher identity (config,
              tokenizer, weights hash), the rendered prompt ids and the generation settings
  targets/    the sparse soft targets of one (prompt ids, response ids) pair; keyed by teacher
              identity, both id sequences, vocabulary size, top-k and temperature
Writes are atomic (temp file + rename); a corrupt entry reads as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from kd_worker.engine.data import FIELDS, SoftTargets


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TargetCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def _write(self, path: Path, tensors: dict[str, np.ndarray]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def _read(self, path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            return None

    def get_response(self, key: str) -> list[int] | None:
        data = self._read(self._path("responses", key))
        return None if data is None else data["response_ids"].tolist()

    def put_response(self, key: str, ids: list[int]) -> None:
        self._write(self._path("responses", key), {"response_ids": np.asarray(ids, np.int32)})

    def get_targets(self, key: str) -> SoftTargets | None:
        data = self._read(self._path("targets", key))
        if data is None or any(f not in data for f in FIELDS):
            return None
        return SoftTargets(*(data[f] for f in FIELDS))

    def put_targets(self, key: str, t: SoftTargets) -> None:
        self._write(self._path("targets", key), {f: np.ascontiguousarray(getattr(t, f)) for f in FIELDS})
