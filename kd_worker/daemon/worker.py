"""KDWorker: rq's SimpleWorker (no fork per job: a fork after MLX has evaluated anything hangs,
and forking after Metal starts crashes on macOS) with what a weeks-long training daemon needs:

- only jobs shaped exactly like kd-client's run (kd_worker.daemon.contract): the allow-listed task
  with one `payload` keyword, no callbacks, webhooks or dependencies, rq's fields well-typed, data
  checked by size before it is inflated; anything else is refused before rq reads it and recorded
  as failed, and the work loop goes on;
- a heartbeat thread keeps the job's StartedJobRegistry entry, the worker key and a health key
  alive while a job really runs (rq sets the expiry once; rq#1604/#2424);
- cancel is cooperative (rq's stop-job calls kill_horse, a no-op for SimpleWorker) and applies to
  the run it was sent for;
- SIGTERM (launchd/systemd) asks the running job to checkpoint and requeue itself;
- at start-up, jobs this worker left "started" when it died are requeued (rq's own abandoned-
  job path: retries_left), and a worker name still alive elsewhere is refused;
- after Redis was away (`lost_redis`), `rejoin` clears the registration rq could not close and
  requeues this worker's jobs, so `kd-worker run` resumes in-process;
- while a job runs (and only then) a Mac is kept awake (`kd_worker.daemon.power`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

import structlog
from redis import Redis, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from jobs.errors import ConfigError, JobCanceled, KDError
from jobs.models import active_key, health_key
from kd_worker.daemon.contract import ContractJob, JobRefused, record_refusal
from kd_worker.daemon.power import KeepAwake
from kd_worker.daemon.runtime import JobControl

log = structlog.get_logger(__name__)


class KDWorker(SimpleWorker):
    def __init__(
        self,
        queues,
        connection: Redis,
        control: JobControl,
        heartbeat_interval: float = 5.0,
        lost_job_grace: float = 60.0,
        keep_awake: Callable[[], AbstractContextManager[Any]] = KeepAwake,
        **kwargs,
    ):
        super().__init__(queues, connection=connection, serializer=JSONSerializer, job_class=ContractJob, **kwargs)
        self.control = control
        self.heartbeat_interval = heartbeat_interval
        self.lost_job_grace = lost_job_grace
        self.keep_awake = keep_awake  # a power assertion held for the duration of each job
        self._current: tuple[Job, Execution] | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.lost_redis = False  # a job's bookkeeping failed because Redis went away (kd-worker run rejoins)
        self.ready = False  # models loaded, serving (the health key says "starting" until then)

    # --- safety -------------------------------------------------------------------------------
    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """rq's dequeue, where a job outside the contract is refused and recorded as failed instead
        of ending the work loop ("unhandled exception, quitting"), and a queue key of the wrong
        type is reported and waited out instead of ending it."""
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except JobRefused as refused:
                queue = getattr(refused, "queue", None)  # rq attaches the queue it popped from
                self.refuse(refused, queue.name if queue is not None else self.queues[0].name)
            except ResponseError as e:
                if "WRONGTYPE" not in str(e):
                    raise
                keys = [q.key for q in self.queues if self.connection.type(q.key) not in (b"list", b"none")]
                log.error("queue_key_wrong_type", keys=keys, error=str(e), retry_in_s=5)
                time.sleep(5)  # a signal still stops the worker (rq raises StopRequested when idle)

    def refuse(self, refused: JobRefused, origin: str) -> None:
        error = refused.error
        if refused.fields is not None:  # None: the key is not a job hash at all; nothing to record there
            record_refusal(self.connection, refused, origin, self.name)
        log.error("job_refused", job_id=refused.job_id, error_type=type(error).__name__, error=str(error))
        log.error("job_failed", job_id=refused.job_id, error_type=type(error).__name__, error=str(error))

    def _finalize_failure(self, job: Job, queue, execution: Execution, exc_info) -> None:
        exc = exc_info[1]
        if isinstance(exc, JobCanceled):
            self._stopped_job_id = job.id  # rq marks it STOPPED, never retried
        elif isinstance(exc, JobTimeoutException) or (isinstance(exc, KDError) and not exc.retryable):
            job.retries_left = 0  # bad input stays bad, a timeout would time out again: fail now
        log.error("job_failed", job_id=job.id, error_type=type(exc).__name__, error=str(exc))
        super()._finalize_failure(job, queue, execution, exc_info)

    # --- cancel and shutdown ------------------------------------------------------------------
    def kill_horse(self, sig=None) -> None:
        """rq's stop-job/stop-execution commands land here (pubsub thread): cancel this run cooperatively."""
        current = self._current
        if current is not None and self._stopped_job_id == current[0].id:
            self.control.cancel(current[1].id)

    def request_stop(self, signum, frame) -> None:
        """First SIGTERM/SIGINT: the running job checkpoints and requeues; then the loop ends."""
        self.control.shutdown()
        super().request_stop(signum, frame)

    # --- heartbeat ----------------------------------------------------------------------------
    def execute_job(self, job: Job, queue) -> None:
        execution = self.prepare_execution(job)
        self._current = (job, execution)
        self.control.start_run(execution.id)
        try:
            with self.keep_awake():
                self.perform_job(job, queue, execution)
        except (RedisConnectionError, RedisTimeoutError):
            self.lost_redis = True  # rq's loop swallows this and returns; the job is recovered on rejoin
            raise
        finally:
            self._current = None
            self.control.end_run()
        self.set_state(WorkerStatus.IDLE)

    def health(self) -> dict[str, Any]:
        current = self._current
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": time.time(),
            "state": "busy" if current else "idle" if self.ready else "starting",
            "job_id": current[0].id if current else None,
            "queues": self.queue_names(),
            "shutting_down": self.control.shutting_down,
        }

    def _beat_once(self) -> None:
        self.connection.set(health_key(self.name), json.dumps(self.health()), ex=self.health_ttl)
        current = self._current
        if current is not None:
            self.maintain_heartbeats(*current)

    @property
    def health_ttl(self) -> int:
        """A health key outlives two missed heartbeats, then a dead worker's name is free again."""
        return int(self.heartbeat_interval * 3) + 1

    def _beat_loop(self) -> None:
        sweep_every = max(1, round(self.lost_job_grace / 2 / self.heartbeat_interval))
        beats = 0
        while not self._beat_stop.wait(self.heartbeat_interval):
            beats += 1
            try:
                self._beat_once()
                if beats % sweep_every == 0:
                    self.sweep_lost_jobs()
            except RedisError as e:
                log.warning("heartbeat_failed", error=str(e))

    def start_heartbeat(self) -> None:
        self._beat_once()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="kd-heartbeat", daemon=True)
        self._beat_thread.start()

    def stop_heartbeat(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        try:
            self.connection.delete(health_key(self.name))
        except RedisError:
            pass

    # --- start-up -----------------------------------------------------------------------------
    def claim_name(self) -> bool:
        """Refuse a name that a live worker holds; clear the key a dead one left behind. A
        predecessor that just crashed still has a health key for up to its TTL: wait that out.
        False if a stop was requested meanwhile."""
        deadline = time.monotonic() + self.health_ttl + 1
        announced = False
        while self.connection.exists(health_key(self.name)):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"a worker named {self.name!r} is alive (its health key is refreshed); "
                    "give this one another KD_WORKER_NAME"
                )
            if not announced:
                log.warning("worker_name_in_use", name=self.name, waiting_s=round(deadline - time.monotonic(), 1))
                announced = True
            if self.control.wait(0.5):  # waiting for a TTL to lapse, or for a stop
                return False
        self.connection.delete(self.key)
        return True

    def rejoin(self) -> list[str]:
        """After Redis came back: drop the registration whose death rq could not record (rq refuses
        to start under a name that still looks alive; this process holds the name), then requeue
        the jobs this worker had started."""
        self.connection.delete(self.key)
        self.lost_redis = False
        return self.recover_orphans()

    def sweep_lost_jobs(self) -> list[str]:
        """rq pops from several queues with BLPOP, so a job popped by a worker (or in Redis's last
        unsynced second) that died before marking it started is "queued" in no queue. Unsettled
        jobs (kd:active:*) seen like that twice, `lost_job_grace` apart, go back to the front of
        their queue (a live worker marks a popped job started within milliseconds). Keys and jobs
        kd-daemon did not write are skipped."""
        queues, requeued = {q.name: q for q in self.queues}, []
        for key in self.connection.scan_iter(match=active_key("*")):
            name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
            if self.connection.type(name) != b"zset":
                log.warning("unsettled_set_skipped", key=name, reason="not a sorted set")
                continue
            # members only (no scores) of a bytes connection; redis-py types a range for every option at once
            for raw in cast("list[bytes]", self.connection.zrange(name, 0, -1)):
                job = self._read_job(raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))
                queue = queues.get(job.origin) if job is not None else None
                if job is None or queue is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                    continue
                if self.connection.lpos(queue.key, job.id) is not None:
                    continue
                marker = f"kd:lost:{job.id}"
                if self.connection.set(marker, time.time(), nx=True, ex=24 * 3600):
                    continue  # first sighting: it may be between a live worker's pop and start
                if time.time() - float(self.connection.get(marker) or time.time()) >= self.lost_job_grace:
                    queue.enqueue_job(job, at_front=True)
                    self.connection.delete(marker)
                    requeued.append(job.id)
        if requeued:
            log.warning("lost_jobs_requeued", jobs=requeued)
        return requeued

    def _read_job(self, job_id: str) -> Job | None:
        try:
            return ContractJob.fetch(job_id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            return None
        except JobRefused as e:  # refused when a worker pops it; nothing to requeue
            log.warning("unreadable_job_skipped", job_id=job_id, error=str(e.error))
            return None

    def recover_orphans(self) -> list[str]:
        """Requeue (via rq's abandoned-job path) the jobs this worker name left started."""
        recovered = []
        for queue in self.queues:
            registry = StartedJobRegistry(queue.name, connection=self.connection, serializer=self.serializer)
            for job_id, exec_id in registry.get_job_and_execution_ids(cleanup=False):
                try:
                    execution = Execution.fetch(exec_id, job_id, connection=self.connection)
                except ValueError:
                    execution = None
                if execution is None or execution.worker_name == self.name:
                    self.connection.zadd(registry.key, {f"{job_id}:{exec_id}": 1})  # expire it now
                    recovered.append(job_id)
            if recovered:
                try:
                    registry.cleanup()
                except (JobRefused, ValueError) as e:  # a job hash kd-client could not have written
                    log.warning("orphan_cleanup_incomplete", queue=queue.name, error=str(e))
        if recovered:
            log.warning("orphans_recovered", jobs=recovered)
        return recovered
