"""The only RQ entry point: `run_kd_job(payload)`. Validates the payload and resolves the job's
KDConfig before touching any file, fetches the training data by sha256, and runs the same
`run_job` as `kd-worker distill`, with the worker's resident models, progress into job.meta,
the per-domain publish order and the domain's corpus (replay, regression set; kd_client.corpus)."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from rq import Retry, get_current_job
from rq.job import Job

from jobs.config import resolve_config
from jobs.errors import ConfigError, DataError, JobInterrupted, SecurityError
from jobs.models import KDJob, blob_key, parse_job
from jobs.publisher import write_bytes_atomic
from kd_client.corpus import Corpus, CorpusLimits
from kd_worker.daemon import ordering
from kd_worker.daemon.lifecycle import run_job
from kd_worker.daemon.progress import JobStop, MetaProgress
from kd_worker.daemon.runtime import current_context
from kd_worker.engine.hooks import HookList
from kd_worker.engine.types import DistillRequest
from kd_worker.settings import WorkerSettings, require_model_dir

log = structlog.get_logger(__name__)

RESUME_RETRIES = 1000  # warm-shutdown requeues are not failures; this only bounds a restart loop


def materialize_data(conn: Redis, job: KDJob, settings: WorkerSettings) -> tuple[tuple[str, Path], ...]:
    """Each DataRef's blob, checked against its size and sha256, as a file in the work dir."""
    out = []
    for ref in job.data:
        if ref.size > settings.max_data_bytes:
            raise DataError(f"{ref.name}: {ref.size} bytes exceeds KD_MAX_DATA_BYTES={settings.max_data_bytes}")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(ref.name).name).lstrip(".") or "data.jsonl"
        path = settings.work_dir / "data" / ref.sha256 / safe  # errors then name the user's file
        if not path.is_file():
            blob = conn.get(blob_key(ref.sha256))
            if blob is None:
                raise DataError(
                    f"{ref.name}: data blob {ref.sha256[:12]} is missing or expired in Redis; resubmit the job"
                )
            if len(blob) != ref.size or hashlib.sha256(blob).hexdigest() != ref.sha256:
                raise DataError(f"{ref.name}: data does not match its sha256 {ref.sha256[:12]} (corrupt or tampered)")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, blob)
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


def job_ticket(rq_job: Job) -> int | None:
    """The submission ticket (publish order) from job.meta; it also names the run directory, so
    anything but an integer (e.g. "../../x" written by a hostile producer) is refused."""
    ticket = rq_job.meta.get("ticket")
    if ticket is not None and (type(ticket) is not int or ticket < 1):
        raise ConfigError(f"job meta ticket {ticket!r} is not a positive integer; submit through kd-client/KDClient")
    return ticket


def run_kd_job(payload: dict[str, Any]) -> Any:
    ctx = current_context()
    rq_job = get_current_job()
    # everything a payload controls is validated before any file is touched
    spec = parse_job(payload)
    cfg = resolve_config(ctx.settings.kd_defaults, spec.overrides)  # the one place a queued job's config is resolved
    ticket = job_ticket(rq_job)
    structlog.contextvars.bind_contextvars(job_id=rq_job.id, domain=spec.domain)
    started = time.perf_counter()
    try:
        teacher, student = resolve_models(spec, ctx.settings)
        data = materialize_data(ctx.connection, spec, ctx.settings)
        # one run dir per submission: retries and requeues resume it, a resubmission starts afresh
        req = DistillRequest(
            spec.domain,
            data,
            teacher,
            student,
            run_id=f"{rq_job.id}-{ticket or 0}",
            job_id=rq_job.id,
            force_publish=spec.force_publish,
            submitter=spec.submitter,
        )
        stop = JobStop(ctx, rq_job.id)
        outcome = run_job(
            req,
            cfg,
            ctx.runtime,
            ctx.settings,
            HookList(stop, MetaProgress(rq_job)),
            publish_guard=lambda: ordering.in_order(ctx.connection, spec.domain, rq_job.id, ticket, stop),
            reuse_outcome=True,
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
