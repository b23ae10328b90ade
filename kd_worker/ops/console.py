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
    """Progress hooks for a terminal: a live bar on a TTY, a log line every few seconds otherwise."""

    def __init__(self, enabled: bool = True, log_every_s: float = 5.0):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.log_every_s = log_every_s
        self._last = 0.0
        self._bar: Bar | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "ConsoleProgress":
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

    def on_progress(self, p: Progress) -> None:
        if not self.enabled:
            return
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
