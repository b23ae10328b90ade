"""`kd-worker run`: the daemon's life. Start-up checks what a configuration can get wrong first
(settings, model dirs, Redis and its credentials, the worker name), and only then loads the teacher
(a 6 GB model on the target Mac: a misconfigured service must not reload it every restart); then
rq's work loop runs, rejoining after Redis outages. A stop requested at any point of start-up, also
while it waits for Redis or for a worker name still in use, is honoured at once.

Exit codes (the service restart rule): 0 after a requested stop or when --burst/--max-jobs are done,
1 when the work loop ends otherwise; a bad configuration raises ConfigError (the CLI exits 78).
"""

from __future__ import annotations

import signal
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


def wait_for_redis(conn: Redis, control: Any, max_wait_s: float = 60.0) -> bool:
    """Block (with backoff, logging) until Redis answers: a worker outlives Redis restarts. False
    as soon as a stop is requested (`control.wait`)."""
    delay = 0.5
    while True:
        try:
            conn.ping()
            return True
        except AuthenticationError as e:  # waiting will not fix a wrong password: a configuration error
            raise ConfigError(
                f"Redis refused the credentials of KD_REDIS_URL ({e}); set "
                "redis://:PASSWORD@host:port/db or unix:///path/redis.sock?password=PASSWORD"
            ) from e
        except RedisError as e:
            log.warning("redis_unavailable", error=str(e), retry_in_s=delay)
            if control.wait(delay):
                return False
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
    """Configuration checked, then the teacher (and student) made resident, then rq's loop."""
    from kd_worker.daemon.runtime import JobControl, Runtime, WorkerContext, install_context  # mlx: after the BLAS
    from kd_worker.daemon.worker import KDWorker

    teacher = require_model_dir(settings.teacher, "KD_TEACHER")
    student = require_model_dir(settings.student, "KD_STUDENT")
    # TCP keepalive detects a dead peer; a unix socket connection refuses the option (TypeError)
    keepalive = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    conn = Redis.from_url(settings.redis_url, health_check_interval=30, **keepalive)
    control = JobControl()
    started: list[KDWorker] = []
    install_stop_handlers(control, started)  # a stop during start-up is a clean, requested stop
    if not wait_for_redis(conn, control):  # before KDWorker(): its constructor already talks to Redis
        return EXIT_OK
    queues = [Queue(n, connection=conn, serializer=JSONSerializer) for n in queue_names(settings.queue).values()]
    worker = KDWorker(
        queues, conn, control, settings.heartbeat_interval, settings.lost_job_grace, name=settings.worker_name
    )
    if not worker.claim_name():
        return EXIT_OK
    started.append(worker)
    worker.start_heartbeat()  # the name is ours from here on (health "starting" while models load)
    try:
        worker.recover_orphans()
        worker.sweep_lost_jobs()  # first sighting; the heartbeat requeues them a grace period later
        runtime = Runtime(settings)
        runtime.teacher(teacher)  # resident for the life of the process
        if settings.cache_student:
            with runtime.student(student):
                pass
        if control.shutting_down:
            return EXIT_OK
        install_context(WorkerContext(settings, runtime, conn, control))
        worker.ready = True
        log.info(
            "worker_started", name=worker.name, queues=worker.queue_names(), teacher=str(teacher), blas=blas_library
        )
        return work_loop(worker, conn, control, started, settings.log_level, burst, max_jobs)
    finally:
        worker.stop_heartbeat()


def work_loop(worker: Any, conn: Redis, control: Any, started: list[Any], level: str, burst: bool, max_jobs) -> int:
    """rq's loop, rejoining after Redis outages, until a stop or the end of --burst/--max-jobs."""
    while True:
        try:
            worker.work(burst=burst, max_jobs=max_jobs, logging_level=level.upper())
        except (RedisConnectionError, RedisTimeoutError) as e:
            worker.lost_redis = True
            log.warning("work_loop_redis_error", error=str(e))
        except RedisError as e:
            log.warning("work_loop_redis_error", error=str(e))
        if control.shutting_down or worker._stop_requested or burst or max_jobs:
            return EXIT_OK
        if worker.lost_redis or not redis_answers(conn):
            install_stop_handlers(control, started)  # rq's handlers raise StopRequested outside its loop
            try:
                if not wait_for_redis(conn, control):  # Redis went away mid-loop: wait, recover our jobs, resume
                    return EXIT_OK
                worker.rejoin()
            except RedisError as e:  # gone again: wait once more
                worker.lost_redis = True
                log.warning("rejoin_failed", error=str(e))
            continue
        log.error("work_loop_ended_unexpectedly")
        return EXIT_ERROR  # a supervisor (launchd/systemd) restarts us on non-zero exits
