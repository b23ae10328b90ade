"""Producer-side queue operations over Redis: submit (deduplicated, ordered), status, list,
cancel, workers. JSON only; the task is named by its dotted path (kd_client never imports the
worker). Training data goes to Redis once as a content-addressed blob."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.command import send_stop_job_command
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer

from jobs.config import resolve_config
from jobs.errors import DataError, KDError, StateError
from jobs.models import (
    TASK_FUNC,
    DataRef,
    KDJob,
    active_key,
    blob_key,
    cancel_key,
    check_key_types,
    domain_key_types,
    health_key,
    parse_job,
    queue_names,
    run_id,
    seq_key,
)
from jobs.records import DataKind, read_records
from kd_client.settings import ClientSettings

RESTARTABLE = {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
FINAL = frozenset({"finished", "failed", "stopped", "canceled"})  # states a job never leaves


@dataclass(frozen=True)
class Dataset:
    kind: DataKind
    data: bytes
    name: str
    records: int

    @functools.cached_property
    def sha256(self) -> str:  # up to KD_MAX_DATA_BYTES: hashed once, read three times per submit
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Submitted:
    job_id: str
    duplicate: bool
    ticket: int | None = None


def check_data_size(data: bytes, name: str, max_bytes: int) -> None:
    """The limit applies to the bytes as given: blank lines and padding count."""
    if len(data) > max_bytes:
        raise DataError(f"{name}: {len(data):,} bytes exceeds KD_MAX_DATA_BYTES={max_bytes:,}; split the data")


def prepare_dataset(kind: DataKind, data: bytes, name: str, max_bytes: int) -> Dataset:
    """Validate every record now, so a bad file fails at the producer, not hours later."""
    check_data_size(data, name, max_bytes)
    return Dataset(kind, data, name, len(read_records(data, kind, name)))


def connect(settings: ClientSettings, retries: int | None = None) -> redis.Redis:
    """A client with the producer's short timeouts; `retries=0` fails at once (a web page must not
    hang through redis-py's default retries with backoff when Redis is down)."""
    extra: dict[str, Any] = {} if retries is None else {"retry": RedisRetry(NoBackoff(), retries)}
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.connect_timeout,
        socket_timeout=settings.socket_timeout,
        **extra,
    )


def build_job(
    domain: str, datasets: Sequence[Dataset], overrides: dict[str, Any] | None = None, **fields: Any
) -> KDJob:
    """The job payload, validated exactly as the worker will (jobs.models.parse_job)."""
    resolve_config(overrides or {})  # unknown or out-of-range settings fail at submit time
    refs = [
        DataRef(kind=d.kind, sha256=d.sha256, records=d.records, size=len(d.data), name=d.name[:200]) for d in datasets
    ]
    return parse_job({"domain": domain, "data": refs, "overrides": overrides or {}, **fields})


def fetch(conn: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError:
        return None
    except (ValueError, TypeError, KeyError) as e:  # rq cannot read it; a worker refuses it when it pops it
        raise StateError(
            f"job {job_id} in Redis is not readable ({type(e).__name__}: {e}): kd-client did not write it"
        ) from e


def check_state(conn: redis.Redis, domain: str, datasets: Sequence[Dataset]) -> None:
    """StateError naming any key of the domain or the data that holds a type kd-daemon never writes
    (a raw WRONGTYPE from Redis says neither which key nor what to do)."""
    expected = {**domain_key_types(domain), **{blob_key(d.sha256): "string" for d in datasets}}
    with conn.pipeline(transaction=False) as pipe:
        for key in expected:
            pipe.type(key)
        found = [t.decode() if isinstance(t, bytes) else str(t) for t in pipe.execute()]
    check_key_types(dict(zip(expected, found, strict=True)), expected)


def submit(conn: redis.Redis, settings: ClientSettings, job: KDJob, datasets: Sequence[Dataset]) -> Submitted:
    """Enqueue once: the same domain + data + settings + models returns the existing job."""
    check_state(conn, job.domain, datasets)
    try:
        return _submit(conn, settings, job, datasets)
    except redis.ResponseError as e:
        if "WRONGTYPE" not in str(e):
            raise
        check_state(conn, job.domain, datasets)  # names the key that changed type meanwhile
        raise StateError(f"a Redis key of this submission changed type: {e}") from e


def _submit(conn: redis.Redis, settings: ClientSettings, job: KDJob, datasets: Sequence[Dataset]) -> Submitted:
    job_id = job.dedup_key()
    existing = fetch(conn, job_id)
    if existing is not None:
        if existing.get_status(refresh=False) not in RESTARTABLE:  # Job.fetch already read the status
            return Submitted(job_id, True, existing.meta.get("ticket"))
        existing.delete()  # a failed/stopped/canceled run is retried by submitting it again
    with conn.pipeline() as pipe:
        for d in datasets:
            pipe.set(blob_key(d.sha256), d.data, nx=True, ex=settings.blob_ttl)
            pipe.expire(blob_key(d.sha256), settings.blob_ttl)
        pipe.execute()
    ticket = int(conn.incr(seq_key(job.domain)))
    queue = Queue(queue_names(settings.queue)[job.priority], connection=conn, serializer=JSONSerializer)
    retry = Retry(max=settings.max_attempts - 1) if settings.max_attempts > 1 else None
    try:
        queue.enqueue(
            TASK_FUNC,
            kwargs={"payload": job.model_dump(mode="json")},
            job_id=job_id,
            unique=True,
            job_timeout=settings.job_timeout,
            result_ttl=settings.result_ttl,
            failure_ttl=settings.failure_ttl,
            retry=retry,
            meta={"ticket": ticket, "domain": job.domain, "submitter": job.submitter},
            description=f"kd {job.domain}: {sum(d.records for d in job.data)} records",
        )
    except DuplicateJobError:
        return Submitted(job_id, True)
    conn.zadd(active_key(job.domain), {job_id: ticket})
    return Submitted(job_id, False, ticket)


def describe(job: Job) -> dict[str, Any]:
    """A JSON-ready view of a job: status, progress, outcome or error."""
    status = job.get_status(refresh=False)  # Job.fetch already read it
    result = job.latest_result()
    out: dict[str, Any] = {
        "id": job.id,
        "status": status.value if status else None,
        "domain": job.meta.get("domain"),
        "ticket": job.meta.get("ticket"),
        "queue": job.origin,
        "worker": job.worker_name,
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at or (result.execution_ended_at if result is not None else None)),
        "progress": job.meta.get("progress"),
        "description": job.description,
    }
    if result is not None and result.type == result.Type.SUCCESSFUL and isinstance(result.return_value, dict):
        out["outcome"] = result.return_value
    elif result is not None and result.exc_string:
        out["error"] = last_error_line(result.exc_string)
        out["traceback"] = result.exc_string
    return out


def last_error_line(exc_string: str) -> str:
    lines = [ln for ln in exc_string.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else exc_string


def _iso(dt) -> str | None:
    return dt.isoformat(timespec="seconds") if dt else None


def all_job_ids(conn: redis.Redis, settings: ClientSettings) -> list[str]:
    ids: list[str] = []
    for name in queue_names(settings.queue).values():
        q = Queue(name, connection=conn, serializer=JSONSerializer)
        ids += q.get_job_ids()
        for reg in (
            StartedJobRegistry,
            DeferredJobRegistry,
            ScheduledJobRegistry,
            FinishedJobRegistry,
            FailedJobRegistry,
            CanceledJobRegistry,
        ):
            ids += reg(name, connection=conn, serializer=JSONSerializer).get_job_ids(cleanup=False)
    return list(dict.fromkeys(ids))


def list_jobs(conn: redis.Redis, settings: ClientSettings, states: set[str] | None = None) -> list[dict[str, Any]]:
    jobs = [j for j in Job.fetch_many(all_job_ids(conn, settings), connection=conn, serializer=JSONSerializer) if j]
    rows = [describe(j) for j in jobs if not states or j.get_status(refresh=False) in states]
    return sorted(rows, key=lambda r: r["enqueued_at"] or "")


def cancel(conn: redis.Redis, job_id: str) -> str:
    """A queued job never starts; a running one stops at its next step (cooperative)."""
    job = fetch(conn, job_id)
    if job is None:
        raise KDError(f"no job {job_id!r} (finished jobs are kept for KD_RESULT_TTL)")
    status = job.get_status(refresh=False)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
        return "canceled"
    if status == JobStatus.STARTED:
        ticket = job.meta.get("ticket")
        run = run_id(job_id, ticket if type(ticket) is int else 0)
        conn.set(cancel_key(job_id), run, ex=24 * 3600)  # this run only; seen by the job even if pubsub is missed
        try:
            send_stop_job_command(conn, job_id, serializer=JSONSerializer)
        except InvalidJobOperation:
            pass
        return "stopping"
    raise KDError(
        f"job {job_id} is {status.value if status else 'unknown'}; only queued or running jobs can be canceled"
    )


WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
START_HINT = "start one with `kd-worker run` (or as a service: `kd-worker service install`)"


@dataclass(frozen=True)
class Waiting:
    """Where a job that has not started stands: its queue, its place, and who could take it."""

    queue: str
    position: int | None  # 1-based place in its queue (None: deferred or scheduled, not in the list yet)
    queued: int  # jobs in its queue
    ahead_higher: int  # jobs in higher-priority queues, which a worker takes first
    workers: int  # live workers (health keys) listening to its queue and not shutting down


def waiting(conn: redis.Redis, settings: ClientSettings, job: Job) -> Waiting:
    """The job's place in its queue and the live workers that serve that queue."""
    names = list(queue_names(settings.queue).values())  # priority order: high, normal, low
    origin = job.origin
    higher = names[: names.index(origin)] if origin in names else []
    queue = Queue(origin, connection=conn, serializer=JSONSerializer)
    pos = queue.get_job_position(job.id)  # 0-based, None when not in the list
    serving = [w for w in workers(conn) if origin in (w.get("queues") or []) and not w.get("shutting_down")]
    return Waiting(
        queue=origin,
        position=None if pos is None else pos + 1,
        queued=queue.count,
        ahead_higher=sum(Queue(n, connection=conn, serializer=JSONSerializer).count for n in higher),
        workers=len(serving),
    )


def waiting_lines(w: Waiting) -> list[str]:
    """What `watch` and the dashboard say about a waiting job; a second line when no worker serves it."""
    place = f"position {w.position} of {w.queued} in {w.queue}" if w.position else f"not yet in {w.queue}"
    ahead = f" ({w.ahead_higher} job{'s' * (w.ahead_higher != 1)} in higher-priority queues first)"
    served = f"{w.workers} live worker{'s' * (w.workers != 1)} serve{'s' * (w.workers == 1)} {w.queue}"
    lines = [f"waiting: {place}{ahead if w.ahead_higher else ''}; {served}"]
    if not w.workers:
        lines.append(f"no live worker serves queue {w.queue}: {START_HINT}")
    return lines


def workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Workers with a live health key (TTL-bound) and what they are doing."""
    keys = list(conn.scan_iter(match=health_key("*")))
    out = [json.loads(raw) for raw in (conn.mget(keys) if keys else []) if raw]  # a key may lapse in between
    for info in out:
        info["age_s"] = round(time.time() - info.get("at", time.time()), 1)
    return sorted(out, key=lambda w: w["name"])
