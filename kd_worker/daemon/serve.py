"""`kd-worker run`: the daemon's life. The teacher (and student) load once, before the loop; then rq's
work loop runs, rejoining after Redis outages; a stop requested during start-up is honoured.

Exit codes (the service restart rule): 0 after a requested stop or when --burst/--max-jobs are done,
1 when the work loop ends otherwise; a bad configuration raises ConfigError (the CLI exits 78).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import structlog
from redis import Redis, RedisError
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.serializers import JSONSerializer

from jobs.errors import ConfigError
from jobs.models import queue_names
from kd_worker.settings import WorkerSettings, require_model_dir

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_ERROR = 0, 1


def wait_for_redis(conn: Redis, max_wait_s: float = 60.0) -> None:
    """Block (with backoff, logging) until Redis answers: a worker outlives Redis restarts."""
    delay = 0.5
    while True:
        try:
            conn.ping()
            return
        except AuthenticationError as e:  # waiting will not fix a wrong password: a configuration error
            raise ConfigError(
                f"Redis refused the credentials of KD_REDIS_URL ({e}); set "
                "redis://:PASSWORD@host:port/db or unix:///path/redis.sock?password=PASSWORD"
            ) from e
        except RedisError as e:
            log.warning("redis_unavailable", error=str(e), retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, max_wait_s)


def redis_answers(conn: Redis) -> bool:
    try:
        return bool(conn.ping())
    except RedisError:
        return False


def install_stop_handlers(control: Any, started: list[Any]) -> None:
    """SIGTERM/SIGINT before rq's work() installs its own handlers (model loading, start-up):
    note the stop, and make rq's loop stop at its first check instead of taking a job."""

    def stop(signum, frame):
        control.shutdown()
        for worker in started:
            worker._stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve(settings: WorkerSettings, blas_library: str | None, burst: bool = False, max_jobs: int | None = None) -> int:
    """Teacher (and student) resident before the loop, then rq's loop, rejoining after Redis outages."""
    from kd_worker.daemon.runtime import JobControl, Runtime, WorkerContext, install_context  # mlx: after the BLAS
    from kd_worker.daemon.worker import KDWorker

    teacher = require_model_dir(settings.teacher, "KD_TEACHER")
    student = require_model_dir(settings.student, "KD_STUDENT")
    # TCP keepalive detects a dead peer; a unix socket connection refuses the option (TypeError)
    keepalive = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    conn = Redis.from_url(settings.redis_url, health_check_interval=30, **keepalive)
    runtime, control = Runtime(settings), JobControl()
    started: list[KDWorker] = []
    install_stop_handlers(control, started)  # a stop during start-up is a clean, requested stop
    runtime.teacher(teacher)  # resident for the life of the process
    if settings.cache_student:
        with runtime.student(student):
            pass
    if control.shutting_down:
        return EXIT_OK
    install_context(WorkerContext(settings, runtime, conn, control))
    queues = [Queue(n, connection=conn, serializer=JSONSerializer) for n in queue_names(settings.queue).values()]
    wait_for_redis(conn)  # before KDWorker(): its constructor already talks to Redis
    worker = KDWorker(
        queues, conn, control, settings.heartbeat_interval, settings.lost_job_grace, name=settings.worker_name
    )
    worker.claim_name()
    started.append(worker)
    worker.recover_orphans()
    worker.sweep_lost_jobs()  # first sighting; the heartbeat requeues them a grace period later
    worker.start_heartbeat()
    log.info("worker_started", name=worker.name, queues=worker.queue_names(), teacher=str(teacher), blas=blas_library)
    try:
        while True:
            try:
                worker.work(burst=burst, max_jobs=max_jobs, logging_level=settings.log_level.upper())
            except (RedisConnectionError, RedisTimeoutError) as e:
                worker.lost_redis = True
                log.warning("work_loop_redis_error", error=str(e))
            except RedisError as e:
                log.warning("work_loop_redis_error", error=str(e))
            if control.shutting_down or worker._stop_requested or burst or max_jobs:
                return EXIT_OK
            if worker.lost_redis or not redis_answers(conn):
                try:
                    wait_for_redis(conn)  # Redis went away mid-loop: wait, recover our jobs, resume
                    worker.rejoin()
                except RedisError as e:  # gone again: wait once more
                    worker.lost_redis = True
                    log.warning("rejoin_failed", error=str(e))
                continue
            log.error("work_loop_ended_unexpectedly")
            return EXIT_ERROR  # a supervisor (launchd/systemd) restarts us on non-zero exits
    finally:
        worker.stop_heartbeat()
