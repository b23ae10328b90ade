"""The extension points of a job, in the spirit of mlx-lm's `TrainingCallback`: progress of every
phase, each training step and validation, and one question asked between units of work: should
the job stop? Cancel, warm shutdown (SIGTERM) and the memory budget are stop reasons plugged in
here by whoever runs the job; the engine only asks, and turns the answer into the job's error.

Neutral on purpose: it imports nothing else from the engine, so the daemon, the CLI and the
engine's steps can all depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from jobs.errors import JobCanceled, JobInterrupted, ResourceLimitExceeded

# "converged" is a normal early end (patience ran out): the loop saves and returns, nothing raises
StopKind = Literal["cancel", "shutdown", "memory", "converged"]


@dataclass(frozen=True)
class Progress:
    phase: str  # "generate" | "score" | "train" | "validate" | "publish"
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    eta_s: float | None = None


@dataclass(frozen=True)
class Stop:
    """Why a job must stop now; `detail` says more (the memory reached, for instance)."""

    kind: StopKind
    detail: str = ""


class Hooks:
    """No-op defaults; subclass and override what you need, combine several with `HookList`."""

    def on_progress(self, progress: Progress) -> None:
        """A phase advanced (generation, scoring, training, validation, publishing)."""

    def on_step(self, step: int, row: dict[str, float]) -> None:
        """A training step finished; `row` is its line of kd_metrics.json's "train" history."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """A validation at `step` finished (step 0 is the untrained student)."""

    def should_stop(self) -> Stop | None:
        """Asked between units of work (batches, steps, decode chunks); None: carry on."""
        return None


class HookList(Hooks):
    """Several hooks as one: events go to each in order; the first stop reason wins."""

    def __init__(self, *hooks: Hooks):
        self.hooks = hooks

    def on_progress(self, progress: Progress) -> None:
        for h in self.hooks:
            h.on_progress(progress)

    def on_step(self, step: int, row: dict[str, float]) -> None:
        for h in self.hooks:
            h.on_step(step, row)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for h in self.hooks:
            h.on_eval(step, metrics)

    def should_stop(self) -> Stop | None:
        for h in self.hooks:
            if (stop := h.should_stop()) is not None:
                return stop
        return None


class StopWhen(Hooks):
    """A stop reason from a plain function (`lambda: None` never stops)."""

    def __init__(self, check: Callable[[], Stop | None]):
        self.check = check

    def should_stop(self) -> Stop | None:
        return self.check()


def raise_for_stop(stop: Stop | None, where: str, resume_note: str) -> None:
    """Turn a stop reason into the job's error: canceled, interrupted (it resumes), or over budget.
    "converged" is no error: the training loop ends early on it, every other unit of work carries on."""
    if stop is None or stop.kind == "converged":
        return
    if stop.kind == "cancel":
        raise JobCanceled(f"canceled {where}")
    if stop.kind == "shutdown":
        raise JobInterrupted(f"interrupted for shutdown {where}; {resume_note}")
    raise ResourceLimitExceeded(f"stopped {where}: {stop.detail}")


def check_stop(hooks: Hooks, where: str, resume_note: str) -> None:
    raise_for_stop(hooks.should_stop(), where, resume_note)
