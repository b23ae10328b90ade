"""Rendering a job's Progress events for a person at a terminal (rich bar) or a log (structlog)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import structlog

from kd_worker.engine.hooks import Hooks, Progress

if TYPE_CHECKING:
    from rich.progress import Progress as Bar
    from rich.progress import TaskID

log = structlog.get_logger(__name__)


class ConsoleProgress(Hooks):
    """Progress hooks for a terminal: a live bar on a TTY, a log line every few seconds otherwise
    (`tty=False` forces the log lines, e.g. when stdout carries JSON). Either way one
    `phase_finished` event per phase: its seconds (from the end of the previous phase), last
    step, throughput and MLX's memory (the job's peak so far, and in use)."""

    def __init__(self, enabled: bool = True, log_every_s: float = 5.0, tty: bool | None = None):
        self.enabled = enabled
        self.tty = enabled and (sys.stderr.isatty() if tty is None else tty)
        self.log_every_s = log_every_s
        self._last = 0.0
        self._bar: Bar | None = None
        self._tasks: dict[str, TaskID] = {}
        self._phase: Progress | None = None  # the current phase's latest event
        self._phase_t0 = self._mark = time.monotonic()

    def __enter__(self) -> "ConsoleProgress":
        self._phase_t0 = self._mark = time.monotonic()
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("{task.description:>9}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._finish_phase()

    def on_progress(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self._phase is not None and p.phase != self._phase.phase:
            self._finish_phase()
            self._phase_t0 = self._mark
        self._phase, self._mark = p, time.monotonic()
        info = " ".join(f"{k}={v:.3f}" for k, v in p.metrics.items())
        if p.tokens_per_s:
            info += f" {p.tokens_per_s:.0f} tok/s"
        if self._bar is not None:
            if p.phase not in self._tasks:
                self._tasks[p.phase] = self._bar.add_task(p.phase, total=max(p.total, 1), info="")
            self._bar.update(self._tasks[p.phase], completed=p.step, info=info)
        elif time.monotonic() - self._last >= self.log_every_s or p.step == p.total:
            self._last = time.monotonic()
            log.info("progress", phase=p.phase, step=p.step, total=p.total, eta_s=p.eta_s, **p.metrics)

    def _finish_phase(self) -> None:
        p = self._phase
        if p is None:
            return
        import mlx.core as mx  # loaded by the job already; imported here so the CLI stays mlx-free until then

        self._phase = None
        log.info(
            "phase_finished",
            phase=p.phase,
            seconds=round(self._mark - self._phase_t0, 3),
            step=p.step,
            total=p.total,
            tokens_per_s=p.tokens_per_s,
            mlx_peak_bytes=mx.get_peak_memory(),
            mlx_active_bytes=mx.get_active_memory(),
        )
