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

from jobs.config import resolve_config
from jobs.errors import ModelError
from kd_worker.engine.hooks import StopKind
from kd_worker.engine.memory import Backend, job_budget, read_dims, teacher_form
from kd_worker.engine.models import LoadedModel, load_model_dir, quantized_slowdown
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Runtime:
    def __init__(self, settings: WorkerSettings, backend: Backend | None = None):
        self.settings = settings
        self.backend = backend or Backend.detect()
        self.budget = job_budget(settings.max_job_memory, self.backend)
        self._teacher: LoadedModel | None = None
        self._student: LoadedModel | None = None

    def _load(self, path: Path, dequantize: bool = False) -> LoadedModel:
        return load_model_dir(path, self.settings.compute_dtype, self.settings.work_dir / "identity.json", dequantize)

    def teacher(self, path: Path, student: Path | None = None) -> LoadedModel:
        """The resident teacher, loaded on first use (or when a job names another). A quantized
        teacher on the CPU backend is dequantized when a job of the worker's default settings
        with `student` (default KD_STUDENT) still fits the memory budget."""
        path = Path(path).resolve()
        if self._teacher is None or self._teacher.path.resolve() != path:
            if self._teacher is not None:
                log.info("teacher_swapped", old=str(self._teacher.path), new=str(path))
                self._teacher = None
                mx.clear_cache()
            self._teacher = self._load(path, self._teacher_form(path, student or self.settings.student))
        return self._teacher

    def _teacher_form(self, path: Path, student: Path | None) -> bool:
        try:
            dims = read_dims(path)
        except ModelError:
            return False  # load_model_dir says what is wrong with the directory
        if dims.bits is None or self.backend.metal:
            return False
        cfg = resolve_config(self.settings.kd_defaults)
        try:  # no student known (or readable) yet: plan with the teacher's own shape, the safe side
            s_dims = read_dims(student) if student is not None else dims
        except ModelError:
            s_dims = dims
        form = teacher_form(dims, s_dims, cfg, self.budget, self.backend, self.settings.compute_dtype)
        plan = form.plan(dims, s_dims, cfg)
        if form.dequantize:
            log.info(
                "teacher_dequantized", path=str(path), bits=dims.bits, plan_bytes=plan.total, budget=self.budget.bytes
            )
        else:
            slowdown = quantized_slowdown(dims.hidden, dims.intermediate, dims.bits, dims.group_size)
            log.warning(
                "teacher_kept_quantized",
                path=str(path),
                bits=dims.bits,
                reason=f"KD_COMPUTE_DTYPE={self.settings.compute_dtype}"
                if self.settings.compute_dtype not in ("auto", "float32")
                else "dequantized it would not fit the memory budget",
                plan_bytes=plan.total,
                budget=self.budget.bytes,
                slowdown_measured=round(slowdown, 1),
                note=f"its matmuls run {slowdown:.0f}x slower than float32 on this CPU; expect a slow teacher phase",
            )
        return form.dequantize

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
