"""The write-once resident models of a worker process: one teacher at a time (swapped, and
logged, when a job names another) and the last student base (LoRA layers removed after each
job so the next one starts from the pristine base)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import structlog

from kd_worker.models import LoadedModel, load_model_dir
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.loads: Counter[str] = Counter()  # "teacher"/"student" -> number of loads (tests, metrics)
        self._teacher: LoadedModel | None = None
        self._student: LoadedModel | None = None

    def _load(self, path: Path, role: str) -> LoadedModel:
        self.loads[role] += 1
        return load_model_dir(path, self.settings.compute_dtype, self.settings.work_dir / "identity.json")

    def teacher(self, path: Path) -> LoadedModel:
        path = Path(path).resolve()
        if self._teacher is None or self._teacher.path.resolve() != path:
            if self._teacher is not None:
                log.info("teacher_swapped", old=str(self._teacher.path), new=str(path))
                self._teacher = None
                mx.clear_cache()
            self._teacher = self._load(path, "teacher")
        return self._teacher

    @contextlib.contextmanager
    def student(self, path: Path) -> Iterator[LoadedModel]:
        from mlx_lm.tuner.utils import remove_lora_layers

        path = Path(path).resolve()
        cached = self._student
        lm = cached if cached is not None and cached.path.resolve() == path else self._load(path, "student")
        self._student = None
        try:
            yield lm
        finally:
            remove_lora_layers(lm.model)
            lm.model.freeze()
            lm.model.eval()
            if self.settings.cache_student:
                self._student = lm
            mx.clear_cache()
