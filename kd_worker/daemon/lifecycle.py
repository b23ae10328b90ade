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
from kd_worker.engine.data import load_examples, split_examples
from kd_worker.engine.distill import distill
from kd_worker.engine.gate import publish_gate
from kd_worker.engine.hooks import HookList, Hooks
from kd_worker.engine.memory import MemoryBudget
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
    teacher = Teacher(runtime.teacher(req.teacher), TargetCache(settings.work_dir / "cache"))
    mx.reset_peak_memory()
    if settings.max_job_memory is not None:
        hooks = HookList(MemoryBudget(settings.max_job_memory), hooks)
    with runtime.student(req.student) as student:
        candidate = distill(req, cfg, examples, teacher, student, run_dir / "checkpoints", hooks, history)
        with publish_guard() as skip:
            outcome = conclude(candidate, settings, skip, hooks, reuse_outcome, remote)
    continual.conclude(corpus, own_val)  # the gate has decided: the held-out split joins the regression set
    outcome.setdefault("seconds", time.perf_counter() - t_start)
    return finish_run(run_dir, outcome)


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
