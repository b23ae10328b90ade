"""Which adapter a run publishes, and when it stops: `select` ("last", or "best": the validation
with the lowest held-out KL to the teacher) and `patience` (end the run after N validations
without a lower KL; 0 = never).

Both read the validation history only (kd_metrics.json's "val" rows, which checkpoints carry),
so a resumed run decides exactly as an uninterrupted one. Step 0 (the untrained student) is
never selected and never the bar: a run publishes something it trained. select=best
checkpoints at every validation (`schedule`), so the selected step's adapter is on disk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jobs.config import KDConfig
from kd_worker.engine.hooks import Hooks, Stop
from kd_worker.engine.trainer import TrainSchedule


@dataclass(frozen=True)
class Selected:
    step: int
    by: Literal["val_kl", "last"]
    val_kl: float | None

    def doc(self) -> dict[str, Any]:
        return {"step": self.step, "by": self.by, "val_kl": self.val_kl}


def val_kls(val: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, held-out KL) of the validations after step 0."""
    return [(int(r["step"]), float(r["kl"])) for r in val if r.get("step", 0) > 0 and "kl" in r]


def choose(val: Sequence[dict[str, Any]], select: str, last_step: int) -> Selected:
    """The published step: the lowest held-out KL (the earliest on a tie) or the last step;
    "last" too when there is no held-out data to choose by."""
    kls = val_kls(val)
    if select == "best" and kls:
        step, kl = min(kls, key=lambda x: x[1])
        return Selected(step, "val_kl", kl)
    at_last = [kl for step, kl in kls if step == last_step]
    return Selected(last_step, "last", at_last[0] if at_last else None)


def last_step(history: dict[str, list[dict[str, Any]]]) -> int:
    """The last trained step of a run (its final or early-stopped end)."""
    return int(history["train"][-1]["step"]) if history["train"] else 0


def validations_without_improvement(val: Sequence[dict[str, Any]]) -> int:
    """How many validations since the one with the lowest KL (0: the latest is the best)."""
    kls = [kl for _, kl in val_kls(val)]
    if not kls:
        return 0
    best = min(range(len(kls)), key=lambda i: (kls[i], i))
    return len(kls) - 1 - best


def schedule(cfg: KDConfig) -> TrainSchedule:
    """The job's schedule; select=best also checkpoints at every validation step: at the
    validation cadence when that is the finer one, else at a common divisor of both."""
    s = TrainSchedule.from_config(cfg)
    if cfg.select == "best" and cfg.val_every % cfg.save_every:
        every = cfg.val_every if cfg.val_every < cfg.save_every else math.gcd(cfg.save_every, cfg.val_every)
        s = dataclasses.replace(s, save_every=every)
    return s


class Patience(Hooks):
    """Asks the loop to end ("converged") after `patience` validations without a lower KL. `prior`:
    the validation history of the checkpoint the run resumes from (empty for a fresh run)."""

    def __init__(self, patience: int, prior: Sequence[dict[str, Any]] = ()):
        self.patience, self.val = patience, [dict(r) for r in prior]

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.val.append({"step": step, **metrics})

    def should_stop(self) -> Stop | None:
        waited = validations_without_improvement(self.val)
        if self.patience and waited >= self.patience:
            return Stop("converged", f"{waited} validations without a lower held-out KL (patience={self.patience})")
        return None
