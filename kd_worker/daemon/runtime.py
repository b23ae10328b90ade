"""The write-once resident models of a worker process: one teacher at a time (swapped, and
logged, when a job names another) and the last student base (LoRA layers removed after each
job so the next one starts from the pristine base)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog

from kd_worker.engine.hooks import StopKind
from kd_worker.engine.models import LoadedModel, load_model_dir
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self._teacher: LoadedModel | None = None
        self._student: LoadedModel | None = None

    def _load(self, path: Path) -> LoadedModel:
        return load_model_dir(path, self.settings.compute_dtype, self.settings.work_dir / "identity.json")

    def teacher(self, path: Path) -> LoadedModel:
        path = Path(path).resolve()
        if self._teacher is None or self._teacher.path.resolve() != path:
            if self._teacher is not None:
                log.info("teacher_swapped", old=str(self._teacher.path), new=str(path))
                self._teacher = None
                mx.clear_cache()
            self._teacher = self._load(path)
        return self._teacher

    @contextlib.contextmanager
    def student(self, path: Path) -> Iterator[LoadedModel]:
        from mlx_lm.tuner.utils import remove_lora_layers

        path = Path(path).resolve()
        cached = self._student
        lm = cached if cached is not None and cached.path.resolve() == path else self._load(path)
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


class JobControl:
    """Stop requests for the running job, set from rq's threads (pubsub, signals), read between
    training steps on the main thread: cooperative cancel and warm shutdown. A cancel belongs to
    the run it was made for (rq's execution id): the next run of the same job, a resubmission or
    a requeue, starts uncanceled. `wait` sleeps until a stop is requested (start-up waits)."""

    def __init__(self) -> None:
        self._run: str | None = None
        self._canceled = False
        self._stop = threading.Event()

    def start_run(self, run: str) -> None:
        self._run, self._canceled = run, False

    def end_run(self) -> None:
        self._run, self._canceled = None, False

    def cancel(self, run: str) -> None:
        if run == self._run:  # a cancel for a run that has ended does not outlive it
            self._canceled = True

    def shutdown(self) -> None:
        self._stop.set()

    @property
    def shutting_down(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as a stop is requested (SIGTERM during start-up)."""
        return self._stop.wait(seconds)

    def reason(self) -> StopKind | None:
        if self._canceled:
            return "cancel"
        return "shutdown" if self._stop.is_set() else None


@dataclass
class WorkerContext:
    """Start-up resources built once by `kd-worker run` and handed to every job (arq-style)."""

    settings: WorkerSettings
    runtime: Runtime
    connection: Any  # redis.Redis
    control: JobControl


_CONTEXT: WorkerContext | None = None


def install_context(ctx: WorkerContext) -> None:
    """Write-once: the worker installs its context before the first job."""
    global _CONTEXT
    if _CONTEXT is not None and _CONTEXT is not ctx:
        raise RuntimeError("a worker context is already installed in this process")
    _CONTEXT = ctx


def current_context() -> WorkerContext:
    if _CONTEXT is None:
        raise RuntimeError("kd_worker.daemon.task runs only inside `kd-worker run` (no worker context installed)")
    return _CONTEXT
