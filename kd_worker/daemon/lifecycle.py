"""The life of one job in a worker process, around the engine's pipeline: load its data, borrow
the resident models, train a candidate, gate it, publish it, and record the outcome so that a
retry of the same run never publishes twice. `kd-worker distill` runs the same function
in-process (without the queue's ordering guard).

    data (fails before any model loads) -> corpus record + replay plan (daemon.continual)
      -> runtime.teacher / runtime.student -> engine.distill -> [publish guard] engine.gate
      -> engine.outputs.publish -> regression set joined -> outcome.json
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import structlog

from jobs import publisher
from jobs.config import KDConfig
from kd_worker.daemon import continual
from kd_worker.daemon.continual import DomainCorpus
from kd_worker.daemon.runtime import Runtime
from kd_worker.engine import outputs
from kd_worker.engine.cache import TargetCache
from kd_worker.engine.data import Example, load_examples, split_examples
from kd_worker.engine.distill import distill, fits
from kd_worker.engine.gate import publish_gate
from kd_worker.engine.hooks import HookList, Hooks
from kd_worker.engine.memory import JobShape, MemoryBudget, MemoryPlan, Precision, check_plan, plan_job, read_dims
from kd_worker.engine.models import resident_bytes
from kd_worker.engine.teacher import Teacher
from kd_worker.engine.types import Candidate, DistillRequest
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

PublishGuard = Callable[[], AbstractContextManager[str | None]]


class Remote(Protocol):
    """The Redis side of publishing (kd_worker/daemon/remote.py), used inside the publish guard."""

    def prepare(self, domain: str) -> None: ...

    def reserve(self, domain: str) -> int: ...

    def push(self, version: publisher.Version) -> None: ...


def run_job(
    req: DistillRequest,
    cfg: KDConfig,
    runtime: Runtime,
    settings: WorkerSettings,
    hooks: Hooks,
    publish_guard: PublishGuard = contextlib.nullcontext,
    reuse_outcome: bool = False,
    remote: Remote | None = None,
    corpus: DomainCorpus | None = None,
) -> dict[str, Any]:
    """The whole job; returns a JSON-ready outcome (published version, metrics, timings).
    `publish_guard` wraps gate + publish: the queue worker uses it to publish the jobs of one
    domain in submission order; it yields None to go ahead, or a reason to skip publishing.
    `reuse_outcome`: retries of one queue submission return a finished run's outcome.
    `remote`: the version also goes to Redis (KD_PUBLISH_TO=redis|both), inside the guard.
    `corpus`: the domain's corpus (daemon.continual); None (`kd-worker distill`): no replay and no
    regression set, only a warm start from the local adapters directory."""
    t_start = time.perf_counter()
    run_dir = settings.work_dir / "runs" / req.run_id
    if reuse_outcome and (done := read_outcome(run_dir)) is not None:
        log.info("run_already_done", run_id=req.run_id, published=done.get("published"))
        return done  # a retry after the job's bookkeeping (not its work) failed: never publish twice
    examples = load_examples(req.data, settings.max_examples)  # bad data fails before any model loads
    own_train, own_val = split_examples(examples, cfg.val_fraction, cfg.seed)  # the split distill makes
    if corpus is not None:
        continual.record_job(corpus, req, own_train, own_val)  # before training: a kill loses nothing
    if remote is not None and cfg.init == "current":
        remote.prepare(req.domain)  # warm start from the domain's newest version, whichever worker published it
    history = continual.plan(corpus, req, cfg, examples, run_dir, settings.publish_root)
    teacher = Teacher(runtime.teacher(req.teacher, req.student), TargetCache(settings.work_dir / "cache"))
    # replayed and regression examples are scored too, those that fit this job (distill skips the rest)
    every = [*examples, *(e for e in (*history.replay, *history.regression) if fits(e, cfg, teacher.lm.tokenizer))]
    check_memory(req, cfg, teacher, every, runtime, settings.compute_dtype)  # before the student loads
    mx.reset_peak_memory()
    hooks = HookList(MemoryBudget(runtime.budget.bytes, runtime.budget.source), hooks)
    with runtime.student(req.student) as student:
        candidate = distill(req, cfg, examples, teacher, student, run_dir / "checkpoints", hooks, history)
        with publish_guard() as skip:
            outcome = conclude(candidate, settings, skip, hooks, reuse_outcome, remote)
    continual.conclude(corpus, own_val)  # the gate has decided: the held-out split joins the regression set
    outcome.setdefault("seconds", time.perf_counter() - t_start)
    return finish_run(run_dir, outcome)


def check_memory(
    req: DistillRequest, cfg: KDConfig, teacher: Teacher, examples: list[Example], runtime: Runtime, compute_dtype: str
) -> MemoryPlan:
    """The job's memory plan against the worker's budget, before the student loads or any work
    starts: ResourceLimitExceeded (naming the setting to lower and the value that fits) when it
    cannot fit. On Metal the budget also becomes MLX's memory limit."""
    shape = job_shape(teacher, examples, cfg)
    t_dims, s_dims = read_dims(teacher.lm.path), read_dims(req.student)
    precision = Precision.for_backend(t_dims, s_dims, compute_dtype, cpu=not runtime.backend.metal)
    resident = resident_bytes(teacher.lm.model)

    def plan_for(c: KDConfig) -> MemoryPlan:
        return plan_job(t_dims, s_dims, c, shape, precision, teacher_resident=resident)

    budget = runtime.budget
    plan = check_plan(plan_for, cfg, budget.bytes, budget.source)
    log.info("memory_plan", budget=budget.bytes, **asdict(shape), **plan.as_dict())
    budget.enforce(runtime.backend)
    return plan


def job_shape(teacher: Teacher, examples: list[Example], cfg: KDConfig) -> JobShape:
    """Longest prompt and prompt + response in teacher tokens (a response to generate counts
    gen_max_tokens; a given one its length), and the number of examples."""
    prompts = teacher.prompts(examples, cfg.max_seq_length)  # a prompt too long is a DataError, here already
    encode = teacher.lm.hf_tokenizer.encode
    lengths = [
        len(p) + (cfg.gen_max_tokens if ex.response is None else len(encode(ex.response, add_special_tokens=False)) + 1)
        for ex, p in zip(examples, prompts, strict=True)
    ]
    return JobShape(max(map(len, prompts), default=1), max(lengths, default=1), len(examples))


def conclude(
    c: Candidate,
    settings: WorkerSettings,
    skip: str | None,
    hooks: Hooks,
    reuse_outcome: bool,
    remote: Remote | None = None,
) -> dict[str, Any]:
    """Gate, then publish (or record why not); returns the outcome."""
    req, root = c.request, settings.publish_root
    if reuse_outcome and (mine := own_version(root, req)) is not None:
        log.info("run_already_published", run_id=req.run_id, version=mine["version"])
        if remote is not None and not skip:  # it may have died before the push
            remote.push(publisher.Version(req.domain, mine["version"], Path(mine["adapter_path"])))
        return mine  # a retry after this run's version went live: never twice
    if skip:
        gate = {"decision": "skip", "reason": skip}
    else:
        if remote is not None:
            remote.prepare(req.domain)
        gate = publish_gate(c, root, settings.gate_tolerance, hooks, settings.gate_regression_slack)
    outcome = {"domain": req.domain, "run_id": req.run_id, "gate": gate, "before": c.before, "after": c.after}
    if skip or (gate["decision"] == "reject" and not req.force_publish):
        if not skip:
            publisher.record_rejection(root, req.domain, {"job_id": req.job_id, **gate})
        return {**outcome, "published": False}
    first = remote.reserve(req.domain) if remote is not None else 1
    version = outputs.publish(c, root, gate, settings.keep_versions, hooks, first_number=first)
    if remote is not None:
        remote.push(version)
    return {**outcome, "published": True, "version": version.number, "adapter_path": str(version.path)}


def own_version(root: Path, req: DistillRequest) -> dict[str, Any] | None:
    """This run's outcome if a version it published went live, i.e. its job failed after the
    pointer swap (Redis lost at the ordering guard's exit, a kill before outcome.json)."""
    current = publisher.resolve(root, req.domain)
    for v in reversed(publisher.versions(root, req.domain)):
        if current is None or v.number > current.number:
            continue  # staged and renamed but never made current: publish again
        try:
            entry = json.loads((v.path / publisher.MANIFEST).read_text())["summary"]
        except (OSError, ValueError, KeyError):
            continue
        if entry.get("run_id") == req.run_id:
            metrics = entry.get("metrics", {})
            return {
                "domain": req.domain,
                "run_id": req.run_id,
                "gate": entry.get("gate", {}),
                "before": metrics.get("before", {}),
                "after": metrics.get("after", {}),
                "published": True,
                "version": v.number,
                "adapter_path": str(v.path),
                "seconds": 0.0,
            }
    return None


def read_outcome(run_dir: Path) -> dict[str, Any] | None:
    try:
        outcome: dict[str, Any] = json.loads((run_dir / "outcome.json").read_text())
        return outcome
    except (OSError, ValueError):
        return None


def finish_run(run_dir: Path, outcome: dict[str, Any]) -> dict[str, Any]:
    """Keep only the outcome of a finished run (checkpoints are in the published version; the frozen
    replay sample served only a resume)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / continual.FROZEN).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    publisher.write_json_atomic(run_dir / "outcome.json", outcome)
    return outcome
