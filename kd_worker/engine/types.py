"""The one-job pipeline's types, below every step that uses them (so no step imports the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kd_worker.engine.data import Example, Sequence_, SoftTargets
from kd_worker.engine.vocab import VocabPlan


@dataclass(frozen=True)
class DistillRequest:
    domain: str
    data: tuple[tuple[Literal["prompts", "corrections"], Path], ...]
    teacher: Path
    student: Path
    run_id: str
    overrides: dict[str, Any] = field(default_factory=dict)
    force_publish: bool = False
    job_id: str | None = None
    reuse_outcome: bool = False  # queue retries of one submission: a finished run is not redone


@dataclass
class Scored:
    example: Example
    response_ids: list[int]  # teacher tokens (EOS included when the teacher stopped)
    targets: SoftTargets


@dataclass
class Prepared:
    """What the teacher phase hands to training: student sequences with their soft targets."""

    plan: VocabPlan
    targets: list[SoftTargets]
    train: list[Sequence_]
    val: list[Sequence_]
    teacher_s: float
