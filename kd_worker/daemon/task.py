"""The only RQ entry point: `run_kd_job(payload)`. Validates the payload and resolves the job's
KDConfig before touching any file, fetches the training data by sha256, and runs the same
`run_job` as `kd-worker distill`, with the worker's resident models, progress into job.meta,
the per-domain publish order and the domain's corpus (replay, regression set; kd_client.corpus)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import ResponseError
from rq import Retry, get_current_job
from rq.job import Job

from jobs.config import KDConfig, resolve_config
from jobs.errors import ConfigError, DataError, JobInterrupted, SecurityError, StateError
from jobs.models import (
    DataRef,
    JobMeta,
    KDJob,
    active_key,
    blob_key,
    cancel_key,
    check_key_types,
    domain_key_types,
    parse_job,
    parse_meta,
    run_id,
    seq_key,
)
from jobs.records import DataKind
from jobs.safefs import sha256_file, write_bytes_atomic
from kd_client.corpus import Corpus, CorpusLimits
from kd_worker.daemon import ordering
from kd_worker.daemon.lifecycle import run_job
from kd_worker.daemon.progress import JobStop, MetaProgress
from kd_worker.daemon.remote import RedisPublishing
from kd_worker.daemon.runtime import WorkerContext, current_context
from kd_worker.engine.hooks import HookList
from kd_worker.engine.types import DistillRequest
from kd_worker.settings import WorkerSettings, require_model_dir

log = structlog.get_logger(__name__)

RESUME_RETRIES = 1000  # warm-shutdown requeues are not failures; this only bounds a restart loop


def cached_data_ok(path: Path, ref: DataRef) -> bool:
    """A cached data file is used only while it is a regular file holding exactly its sha256's bytes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode) and st.st_size == ref.size and sha256_file(path) == ref.sha256:
        return True
    log.warning("cached_data_replaced", path=str(path), reason="not the bytes of its sha256 (edited on disk?)")
    return False


def fetch_blob(conn: Redis, ref: DataRef, max_bytes: int) -> bytes:
    """The blob of a DataRef, its size checked in Redis (STRLEN) before it is read."""
    size = conn.strlen(blob_key(ref.sha256))
    if size == 0:
        raise DataError(f"{ref.name}: data blob {ref.sha256[:12]} is missing or expired in Redis; resubmit the job")
    if size > max_bytes:
        raise DataError(f"{ref.name}: the data blob is {size} bytes, over KD_MAX_DATA_BYTES={max_bytes}")
    blob = conn.get(blob_key(ref.sha256)) if size == ref.size else None
    if not isinstance(blob, bytes) or len(blob) != ref.size or hashlib.sha256(blob).hexdigest() != ref.sha256:
        raise DataError(f"{ref.name}: data does not match its sha256 {ref.sha256[:12]} (corrupt or tampered)")
    return blob


def materialize_data(conn: Redis, job: KDJob, settings: WorkerSettings) -> tuple[tuple[DataKind, Path], ...]:
    """Each DataRef's blob, checked against its size and sha256, as a read-only file in the work dir
    (a cached file is re-hashed before use and replaced from Redis if it was changed)."""
    out: list[tuple[DataKind, Path]] = []
    for ref in job.data:
        if ref.size > settings.max_data_bytes:
            raise DataError(f"{ref.name}: {ref.size} bytes exceeds KD_MAX_DATA_BYTES={settings.max_data_bytes}")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(ref.name).name).lstrip(".") or "data.jsonl"
        path = settings.work_dir / "data" / ref.sha256 / safe  # errors then name the user's file
        if not cached_data_ok(path, ref):
            blob = fetch_blob(conn, ref, settings.max_data_bytes)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, blob, mode=0o444)
        out.append((ref.kind, path))
    return tuple(out)


def resolve_models(job: KDJob, settings: WorkerSettings) -> tuple[Path, Path]:
    """Job-named models must live under KD_MODELS_ROOT; otherwise the worker's defaults."""

    def pick(name: str | None, default: Path | None, var: str) -> Path:
        if name is None:
            return require_model_dir(default, var)
        if settings.models_root is None:
            raise SecurityError(f"the job names model {name!r} but this worker has no KD_MODELS_ROOT to look it up")
        root = settings.models_root.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise SecurityError(f"model {name!r} resolves outside KD_MODELS_ROOT")
        return require_model_dir(path, f"model {name!r} under KD_MODELS_ROOT")

    return pick(job.teacher, settings.teacher, "KD_TEACHER"), pick(job.student, settings.student, "KD_STUDENT")


def check_redis_state(conn: Redis, job_id: str, spec: KDJob) -> None:
    """StateError naming any key of this job or its domain that holds a type kd-daemon never writes."""
    expected = {**domain_key_types(spec.domain), cancel_key(job_id): "string"}
    expected.update({blob_key(ref.sha256): "string" for ref in spec.data})
    with conn.pipeline(transaction=False) as pipe:
        for key in expected:
            pipe.type(key)
        found = [t.decode() if isinstance(t, bytes) else str(t) for t in pipe.execute()]
    check_key_types(dict(zip(expected, found, strict=True)), expected)


def check_ticket(conn: Redis, job_id: str, meta: JobMeta) -> int:
    """The ticket (publish order; it names the run) must be one the domain's counter issued and,
    while the job is unsettled, the one the active set records for it: a forged ticket cannot make
    every later job of the domain "superseded"."""
    raw = conn.get(seq_key(meta.domain)) or b"0"
    if not raw.isdigit():
        raise StateError(f"Redis key {seq_key(meta.domain)} holds {raw[:40]!r}, not a counter; delete it")
    if meta.ticket > int(raw):
        raise ConfigError(
            f"job meta ticket {meta.ticket} was never issued: {seq_key(meta.domain)} is at {int(raw)}; "
            "submit through kd-client/KDClient"
        )
    recorded = conn.zscore(active_key(meta.domain), job_id)
    if recorded is not None and recorded != meta.ticket:
        raise ConfigError(
            f"job meta ticket {meta.ticket} is not the one {active_key(meta.domain)} records for the job "
            f"({recorded:.0f}); submit through kd-client/KDClient"
        )
    return meta.ticket


def run_kd_job(payload: dict[str, Any]) -> Any:
    ctx = current_context()
    rq_job = get_current_job()
    if rq_job is None:
        raise RuntimeError("run_kd_job runs only as an rq job of `kd-worker run`")
    # everything a payload or Redis controls is validated before any file is touched
    spec = parse_job(payload)
    cfg = resolve_config(ctx.settings.kd_defaults, spec.overrides)  # the one place a queued job's config is resolved
    meta = parse_meta({k: v for k, v in rq_job.meta.items()})
    if meta.domain != spec.domain:
        raise ConfigError(f"job meta names domain {meta.domain!r} but its payload {spec.domain!r}")
    try:
        check_redis_state(ctx.connection, rq_job.id, spec)
        ticket = check_ticket(ctx.connection, rq_job.id, meta)
        return _run(ctx, rq_job, spec, cfg, ticket)
    except ResponseError as e:
        if "WRONGTYPE" not in str(e):
            raise
        check_redis_state(ctx.connection, rq_job.id, spec)  # names the key that changed type meanwhile
        raise StateError(f"a Redis key of this job changed type while it ran: {e}") from e


def _run(ctx: WorkerContext, rq_job: Job, spec: KDJob, cfg: KDConfig, ticket: int) -> Any:
    structlog.contextvars.bind_contextvars(job_id=rq_job.id, domain=spec.domain)
    started = time.perf_counter()
    run = run_id(rq_job.id, ticket)
    try:
        teacher, student = resolve_models(spec, ctx.settings)
        data = materialize_data(ctx.connection, spec, ctx.settings)
        # one run dir per submission: retries and requeues resume it, a resubmission starts afresh
        req = DistillRequest(
            spec.domain,
            data,
            teacher,
            student,
            run_id=run,
            job_id=rq_job.id,
            force_publish=spec.force_publish,
            submitter=spec.submitter,
        )
        stop = JobStop(ctx, rq_job.id, run)
        outcome = run_job(
            req,
            cfg,
            ctx.runtime,
            ctx.settings,
            HookList(stop, MetaProgress(rq_job)),
            publish_guard=lambda: ordering.in_order(ctx.connection, spec.domain, rq_job.id, ticket, stop),
            reuse_outcome=True,
            remote=RedisPublishing(ctx.connection, ctx.settings) if ctx.settings.publish_to != "local" else None,
            corpus=Corpus(ctx.connection, spec.domain, CorpusLimits.from_settings(ctx.settings)),
        )
    except JobInterrupted as e:
        log.info("job_interrupted", reason=str(e))
        return Retry(max=RESUME_RETRIES, enqueue_at_front=True)
    finally:
        structlog.contextvars.unbind_contextvars("job_id", "domain")
    after = outcome.get("after", {})
    log.info(
        "job_finished",
        job_id=rq_job.id,
        domain=spec.domain,
        duration_s=round(time.perf_counter() - started, 3),
        published=outcome["published"],
        version=outcome.get("version"),
        adapter_path=outcome.get("adapter_path"),
        val_kl=after.get("kl"),
        val_ce=after.get("ce"),
        val_total=after.get("total"),
        gate=outcome["gate"]["decision"],
    )
    return outcome
