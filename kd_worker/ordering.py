"""Publishing the jobs of one domain in submission order, across workers on one Redis.

Producers take a ticket per job (INCR kd:seq:{domain}) and add it to kd:active:{domain}.
Before its publish gate, a job waits while an *earlier* ticket of its domain is still running
on some worker, then publishes under a Redis lock. Waiting only for running jobs (not queued
ones) avoids a deadlock when priorities let a later job start first; in that case the older
job, finishing later, finds a newer ticket already published and does not replace it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import structlog
from redis import Redis
from rq.job import Job, JobStatus
from rq.exceptions import NoSuchJobError

from jobs.errors import JobCanceled, JobInterrupted
from jobs.models import active_key, published_key

log = structlog.get_logger(__name__)

SETTLED = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


def _status(conn: Redis, job_id: str) -> JobStatus | None:
    try:
        return Job.fetch(job_id, connection=conn, serializer="json").get_status()
    except NoSuchJobError:
        return None


def running_earlier(conn: Redis, domain: str, ticket: int) -> list[str]:
    """Earlier tickets still running; settled or vanished entries are dropped on the way."""
    running = []
    for raw, _ in conn.zrangebyscore(active_key(domain), "-inf", ticket - 1, withscores=True):
        jid = raw.decode()
        status = _status(conn, jid)
        if status is None or status in SETTLED:
            conn.zrem(active_key(domain), jid)
        elif status == JobStatus.STARTED:
            running.append(jid)
    return running


@contextlib.contextmanager
def in_order(conn: Redis, domain: str, job_id: str, ticket: int | None, should_stop: Callable[[], str | None],
             poll_s: float = 1.0, lock_timeout_s: int = 600) -> Iterator[str | None]:
    """Yields None to publish now, or the reason to skip (a newer ticket is already published)."""
    if ticket is None:  # a job enqueued without a ticket (not through kd_client) publishes unordered
        yield None
        return
    while waiting := running_earlier(conn, domain, ticket):
        reason = should_stop()
        if reason == "cancel":
            raise JobCanceled("canceled while waiting for earlier jobs of the domain to publish")
        if reason == "shutdown":
            raise JobInterrupted("interrupted while waiting to publish; training is checkpointed")
        log.info("publish_waiting", domain=domain, ticket=ticket, earlier=waiting)
        time.sleep(poll_s)  # waiting on other workers' jobs: a poll interval, not a guessed duration
    with conn.lock(f"kd:lock:publish:{domain}", timeout=lock_timeout_s, blocking_timeout=lock_timeout_s):
        newest = int(conn.get(published_key(domain)) or 0)
        if newest > ticket:
            yield f"superseded: a newer submission (ticket {newest}) of {domain} is already published"
        else:
            yield None
            conn.set(published_key(domain), max(ticket, newest))
    conn.zrem(active_key(domain), job_id)
