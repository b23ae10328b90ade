"""The one-job pipeline's types, below every step that uses them (so no step imports the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import KDConfig
from jobs.records import DataKind
from kd_worker.engine.checkpoints import DirCheckpointStore
from kd_worker.engine.data import Example, SoftTargets, StudentSequence
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.vocab import VocabPlan


@dataclass(frozen=True)
class DistillRequest:
    """One job: the domain, its data files, the models, and who asked (for the record)."""

    domain: str
    data: tuple[tuple[DataKind, Path], ...]
    teacher: Path
    student: Path
    run_id: str  # names the run's checkpoints; retries and requeues of one submission share it
    job_id: str | None = None
    force_publish: bool = False
    submitter: str = "kd-worker"  # for the corpus's provenance


@dataclass(frozen=True)
class Continual:
    """What the domain's past brings to a job; the caller fetches it (daemon.continual: the corpus
    in Redis, the published version), the engine never talks to Redis.

    replay:      earlier jobs' training examples mixed into the batches (KDConfig.replay)
    regression:  earlier jobs' held-out examples, on which the gate compares candidate and published
    init_from:   the published version directory a KDConfig.init="current" job starts from"""

    replay: tuple[Example, ...] = ()
    regression: tuple[Example, ...] = ()
    init_from: Path | None = None


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
    train: list[StudentSequence]
    val: list[StudentSequence]
    teacher_s: float
    replay: list[StudentSequence] = field(default_factory=list)
    regression: list[StudentSequence] = field(default_factory=list)
    replay_keys: list[str] = field(default_factory=list)  # the replayed examples (kd_metrics.json)


@dataclass
class TrainResult:
    history: dict[str, list[dict[str, float]]]
    resumed_from: int
    seconds: float
    tokens: int


@dataclass
class Candidate:
    """A trained adapter not yet published: what the gate judges and the publisher writes."""

    request: DistillRequest
    cfg: KDConfig
    teacher: LoadedModel
    student: LoadedModel  # with the candidate's LoRA layers attached
    data: Prepared
    result: TrainResult
    checkpoints: DirCheckpointStore
    n_examples: int
    identity: dict[str, Any]  # teacher, student, vocabulary and adapter shape (outputs.identity_doc)
    init: dict[str, Any] = field(default_factory=lambda: {"requested": "base", "used": "base"})  # warm start
    samples: list[dict[str, str]] = field(default_factory=list)  # engine.samples: held-out answers before/after
    # the published step (engine.selection): {"step", "by": "val_kl" | "last", "val_kl"}; None: the last
    selected: dict[str, Any] | None = None

    @property
    def after(self) -> dict[str, float]:
        """The validation of the selected step (the last one by default; step 0 is always
        evaluated, so there is one): what kd_metrics.json reports and the publish gate compares."""
        val = self.result.history["val"]
        step = None if self.selected is None else self.selected["step"]
        return next((r for r in val if r["step"] == step), val[-1])

    @property
    def before(self) -> dict[str, float]:
        return self.result.history["val"][0]
