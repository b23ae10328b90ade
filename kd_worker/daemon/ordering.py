"""Publishing the jobs of one domain in submission order, across workers on one Redis.

Producers take a ticket per job (INCR kd:seq:{domain}) and add it to kd:active:{domain}.
Before its publish gate, a job waits while an *earlier* ticket of its domain is still running
on some worker, then publishes under a Redis lock. Waiting only for running jobs (not queued
ones) avoids a deadlock when priorities let a later job start first; in that case the older
job, finishing later, finds a newer ticket already published and does not replace it.

The publish lock's token is the holder's job id. A worker killed while it held the lock (kill -9
in validation or publishing) leaves the key behind; it is broken as soon as its holder is
provably not running: the holder is this very job (an earlier run of it died), or the holder job
is no longer "started", or its worker has no live health key. The lock's TTL is only a backstop.
The same liveness rule applies to earlier tickets: a job whose worker died is not waited for
(once recovered, it finds the newer ticket published and steps aside).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import cast

import structlog
from redis import Redis, RedisError
from redis.exceptions import LockError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.utils import as_text

from jobs.errors import StateError
from jobs.models import active_key, health_key, published_key
from kd_worker.daemon.contract import ContractJob, JobRefused
from kd_worker.engine.hooks import Hooks, check_stop

log = structlog.get_logger(__name__)

SETTLED = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


def _fetch(conn: Redis, job_id: str) -> Job | None:
    """Another job of the domain, read through the job contract: one that kd-client could not have
    written counts as gone (its worker refuses it), so it cannot hold up the domain."""
    try:
        return ContractJob.fetch(job_id, connection=conn, serializer="json")
    except NoSuchJobError:
        return None
    except JobRefused as e:
        log.warning("unreadable_job_ignored", job_id=job_id, error=str(e.error))
        return None


def newest_published(conn: Redis, domain: str) -> int:
    raw = conn.get(published_key(domain)) or b"0"
    if not raw.isdigit():
        raise StateError(f"Redis key {published_key(domain)} holds {raw[:40]!r}, not a ticket; delete it")
    return int(raw)


def is_running(conn: Redis, job: Job) -> bool:
    """Started, and its worker still sends heartbeats (a killed worker's job stays "started" in
    rq until its registry entry expires or the worker restarts and recovers it)."""
    if job.get_status(refresh=False) != JobStatus.STARTED:  # as read by Job.fetch
        return False
    return not job.worker_name or bool(conn.exists(health_key(job.worker_name)))


def running_earlier(conn: Redis, domain: str, ticket: int) -> list[str]:
    """Earlier tickets still running; settled or vanished entries are dropped on the way."""
    running = []
    # members only (no scores) of a bytes connection; redis-py types a range for every option at once
    for raw in cast("list[bytes]", conn.zrangebyscore(active_key(domain), "-inf", ticket - 1)):
        jid = raw.decode()
        job = _fetch(conn, jid)
        if job is None or job.get_status(refresh=False) in SETTLED:
            conn.zrem(active_key(domain), jid)
        elif is_running(conn, job):
            running.append(jid)
    return running


def publish_lock_key(domain: str) -> str:
    return f"kd:lock:publish:{domain}"


# Delete the lock only if it still holds the token we judged stale (atomic compare-and-delete).
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def holder_is_dead(conn: Redis, holder: str, job_id: str) -> bool:
    """A lock holder that cannot be publishing: this job itself (an earlier run of it died holding
    the lock), or a job that is not running (requeued, settled, gone, or its worker is dead)."""
    if holder == job_id:
        return True
    job = _fetch(conn, holder)
    return job is None or not is_running(conn, job)


def _stop_waiting(hooks: Hooks, what: str) -> None:
    check_stop(hooks, f"while waiting for {what}", "training is checkpointed")


def acquire_publish_lock(conn: Redis, domain: str, job_id: str, hooks: Hooks, poll_s: float, lock_timeout_s: int):
    lock = conn.lock(publish_lock_key(domain), timeout=lock_timeout_s)
    while not lock.acquire(blocking=False, token=job_id):
        raw = conn.get(lock.name)
        if raw is not None and holder_is_dead(conn, as_text(raw), job_id):
            if conn.eval(_DELETE_IF, 1, lock.name, raw):
                log.warning("stale_publish_lock_broken", domain=domain, holder=as_text(raw))
            continue
        _stop_waiting(hooks, f"the publish lock of {domain}")
        time.sleep(poll_s)  # another worker is publishing this domain: a poll interval, not a guess
    return lock


@contextlib.contextmanager
def in_order(
    conn: Redis,
    domain: str,
    job_id: str,
    ticket: int | None,
    hooks: Hooks,
    poll_s: float = 1.0,
    lock_timeout_s: int = 24 * 3600,
) -> Iterator[str | None]:
    """Yields None to publish now, or the reason to skip (a newer ticket is already published)."""
    if ticket is None:  # a job enqueued without a ticket (not through kd_client) publishes unordered
        yield None
        return
    while waiting := running_earlier(conn, domain, ticket):
        _stop_waiting(hooks, "earlier jobs of the domain to publish")
        log.info("publish_waiting", domain=domain, ticket=ticket, earlier=waiting)
        time.sleep(poll_s)  # waiting on other workers' jobs: a poll interval, not a guessed duration
    lock = acquire_publish_lock(conn, domain, job_id, hooks, poll_s, lock_timeout_s)
    try:
        newest = newest_published(conn, domain)
        if newest > ticket:
            yield f"superseded: a newer submission (ticket {newest}) of {domain} is already published"
        else:
            yield None
            conn.set(published_key(domain), max(ticket, newest))
    finally:
        try:
            lock.release()
        except (LockError, RedisError) as e:  # left behind: the next publisher finds it stale (this job settled)
            log.warning("publish_lock_not_released", domain=domain, error=str(e))
    conn.zrem(active_key(domain), job_id)
