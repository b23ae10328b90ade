"""KDWorker: rq's SimpleWorker (no fork per job: a fork after MLX has evaluated anything hangs,
and forking after Metal starts crashes on macOS) with what a weeks-long training daemon needs:

- only allow-listed task functions run (a JSON queue still executes any importable callable
  that someone who can write to Redis names), checked before rq resolves the function, with
  exactly one `payload` keyword; a job whose data is not JSON (a pickle) is refused unread;
- a heartbeat thread keeps the job's StartedJobRegistry entry, the worker key and a health key
  alive while a job really runs (rq sets the expiry once; rq#1604/#2424);
- cancel is cooperative (rq's stop-job calls kill_horse, a no-op for SimpleWorker);
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
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.worker import WorkerStatus

from jobs.errors import ConfigError, JobCanceled, KDError, SecurityError
from jobs.models import ALLOWED_TASKS, active_key, health_key
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
        super().__init__(queues, connection=connection, serializer=JSONSerializer, **kwargs)
        self.control = control
        self.heartbeat_interval = heartbeat_interval
        self.lost_job_grace = lost_job_grace
        self.keep_awake = keep_awake  # a power assertion held for the duration of each job
        self._current: tuple[Job, Execution] | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.lost_redis = False  # a job's bookkeeping failed because Redis went away (kd-worker run rejoins)

    # --- safety -------------------------------------------------------------------------------
    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        try:
            func = job.func_name  # JSON-decodes the payload; resolving the function would import it
        except DeserializationError as e:
            raise SecurityError(
                f"job {job.id}: its data is not JSON (rq's default pickle serializer?); this worker "
                "reads JSON only and never unpickles; enqueue with serializer=JSONSerializer"
            ) from e
        if func not in ALLOWED_TASKS:
            log.error("job_refused", job_id=job.id, func=func)
            raise SecurityError(f"task {func!r} is not allowed on this worker; allowed: {sorted(ALLOWED_TASKS)}")
        if job.args or set(job.kwargs) != {"payload"}:  # the task takes exactly one keyword: the payload
            raise ConfigError(
                f"job arguments must be kwargs={{'payload': {{...}}}}; got args={len(job.args)} "
                f"kwargs={sorted(job.kwargs)}; submit through kd-client/KDClient"
            )
        super().prepare_job_execution(job, remove_from_intermediate_queue)

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
        """rq's stop-job/stop-execution commands land here (pubsub thread): cancel cooperatively."""
        if self._stopped_job_id:
            self.control.cancel(self._stopped_job_id)

    def request_stop(self, signum, frame) -> None:
        """First SIGTERM/SIGINT: the running job checkpoints and requeues; then the loop ends."""
        self.control.shutdown()
        super().request_stop(signum, frame)

    # --- heartbeat ----------------------------------------------------------------------------
    def execute_job(self, job: Job, queue) -> None:
        execution = self.prepare_execution(job)
        self._current = (job, execution)
        try:
            with self.keep_awake():
                self.perform_job(job, queue, execution)
        except (RedisConnectionError, RedisTimeoutError):
            self.lost_redis = True  # rq's loop swallows this and returns; the job is recovered on rejoin
            raise
        finally:
            self._current = None
        self.set_state(WorkerStatus.IDLE)

    def health(self) -> dict[str, Any]:
        current = self._current
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": time.time(),
            "state": "busy" if current else "idle",
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
    def claim_name(self) -> None:
        """Refuse a name that a live worker holds; clear the key a dead one left behind. A
        predecessor that just crashed still has a health key for up to its TTL: wait that out."""
        deadline = time.monotonic() + self.health_ttl + 1
        while self.connection.exists(health_key(self.name)):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"a worker named {self.name!r} is alive (its health key is refreshed); "
                    "give this one another KD_WORKER_NAME"
                )
            time.sleep(0.5)  # waiting for a TTL to lapse
        self.connection.delete(self.key)

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
        their queue (a live worker marks a popped job started within milliseconds)."""
        queues, requeued = {q.name: q for q in self.queues}, []
        for key in self.connection.scan_iter(match=active_key("*")):
            # members only (no scores) of a bytes connection; redis-py types a range for every option at once
            ids = [raw.decode() for raw in cast("list[bytes]", self.connection.zrange(key, 0, -1))]
            for job in Job.fetch_many(ids, connection=self.connection, serializer=self.serializer):
                if job is None:
                    continue
                queue = queues.get(job.origin)
                if queue is None or job.get_status(refresh=False) != JobStatus.QUEUED:
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
                registry.cleanup()
        if recovered:
            log.warning("orphans_recovered", jobs=recovered)
        return recovered
