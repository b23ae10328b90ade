"""`kd-worker`: the worker's command line. Sets up settings, logging and a fast BLAS *before*
anything imports mlx, then dispatches to a command."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from jobs.errors import ConfigError, KDError
from kd_worker.blas import ensure_fast_blas
from kd_worker.logs import configure_logging
from kd_worker.settings import WorkerSettings, load_settings, require_model_dir

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_REJECTED, EXIT_CONFIG = 0, 1, 3, 78  # 78 = EX_CONFIG: do not restart


def default_models_dir(settings: WorkerSettings) -> Path:
    return settings.work_dir / "models"


def cmd_doctor(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from rich.console import Console
    from rich.table import Table

    from kd_worker.doctor import run_checks

    checks = run_checks(settings, blas)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        table = Table(title="kd-worker doctor")
        for col in ("check", "status", "detail"):
            table.add_column(col)
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
        Console().print(table)
    failed = [c for c in checks if c.status == "fail" or (args.strict and c.status == "warn")]
    return EXIT_ERROR if failed else EXIT_OK


def cmd_make_models(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from kd_worker.tinymodels import ALL_NAMES, build_demo_models

    out = Path(args.dir) if args.dir else default_models_dir(settings)
    paths = build_demo_models(out, tuple(args.only) if args.only else ALL_NAMES)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    return EXIT_OK


def _file_sha(path: Path) -> str:
    from jobs.publisher import sha256_file

    try:
        return sha256_file(path)
    except OSError as e:
        raise KDError(f"cannot read {path}: {e.strerror}") from e


def cmd_distill(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from jobs.config import parse_overrides, resolve_config
    from kd_worker.distill import DistillRequest, run_distillation
    from kd_worker.progress import ConsoleProgress
    from kd_worker.runtime import Runtime

    if args.out:
        settings = settings.model_copy(update={"adapters_dir": Path(args.out)})
    overrides = parse_overrides(args.set or [])
    resolve_config(settings.kd_defaults, overrides)  # fail fast on a bad --set, before any model loads
    data = [("prompts", Path(p)) for p in args.prompts or []] + [("corrections", Path(p)) for p in args.corrections or []]
    if not data:
        raise KDError("give --prompts FILE and/or --corrections FILE")
    teacher = require_model_dir(Path(args.teacher) if args.teacher else settings.teacher, "--teacher / KD_TEACHER")
    student = require_model_dir(Path(args.student) if args.student else settings.student, "--student / KD_STUDENT")
    ident = json.dumps([args.domain, [(k, _file_sha(p)) for k, p in data], overrides, str(teacher.resolve()),
                        str(student.resolve())], sort_keys=True)
    run_id = "cli-" + hashlib.sha256(ident.encode()).hexdigest()[:20]
    req = DistillRequest(args.domain, tuple(data), teacher, student, run_id, overrides, args.force)
    with ConsoleProgress(enabled=not args.json) as progress:
        outcome = run_distillation(req, Runtime(settings), settings, progress, lambda: None)
    print_outcome(outcome, args.json)
    return EXIT_OK if outcome["published"] else EXIT_REJECTED


def print_outcome(outcome: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(outcome, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kd: {outcome['domain']}")
    table.add_column("held-out")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("kl", "kd", "ce", "total", "top1"):
        if key in outcome.get("after", {}):
            table.add_row(key, f"{outcome['before'].get(key, float('nan')):.4f}", f"{outcome['after'][key]:.4f}")
    console = Console()
    console.print(table)
    gate = outcome["gate"]
    if outcome["published"]:
        console.print(f"published {outcome['domain']} v{outcome['version']}: {outcome['adapter_path']} ({gate['reason']})")
    else:
        console.print(f"[yellow]not published[/]: {gate['reason']} (candidate KL {gate.get('candidate_kl'):.4f} > "
                      f"published {gate.get('published_kl'):.4f}); rerun with --force to publish anyway")


def wait_for_redis(conn, max_wait_s: float = 60.0) -> None:
    """Block (with backoff, logging) until Redis answers: a worker outlives Redis restarts."""
    import time

    from redis import RedisError
    from redis.exceptions import AuthenticationError

    delay = 0.5
    while True:
        try:
            conn.ping()
            return
        except AuthenticationError as e:  # waiting will not fix a wrong password: a configuration error
            raise ConfigError(f"Redis refused the credentials of KD_REDIS_URL ({e}); set "
                              "redis://:PASSWORD@host:port/db or unix:///path/redis.sock?password=PASSWORD") from e
        except RedisError as e:
            log.warning("redis_unavailable", error=str(e), retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, max_wait_s)


def redis_answers(conn) -> bool:
    from redis import RedisError

    try:
        return bool(conn.ping())
    except RedisError:
        return False


def install_stop_handlers(control, started: list) -> None:
    """SIGTERM/SIGINT before rq's work() installs its own handlers (model loading, start-up):
    note the stop, and make rq's loop stop at its first check instead of taking a job."""
    import signal

    def stop(signum, frame):
        control.shutdown()
        for worker in started:
            worker._stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def cmd_run(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    """The daemon. Exit codes (the service restart rule): 0 after a requested stop (SIGTERM/SIGINT)
    or when --burst/--max-jobs are done, 1 when the work loop ends otherwise, 78 on a bad configuration."""
    try:
        return serve(args, settings, blas)
    except ConfigError as e:
        print(f"kd-worker run: {e}", file=sys.stderr)
        return EXIT_CONFIG


def serve(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    """Teacher (and student) resident before the loop, then rq's loop, rejoining after Redis outages."""
    from redis import Redis, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
    from rq import Queue
    from rq.serializers import JSONSerializer

    from jobs.models import queue_names
    from kd_worker.runtime import JobControl, Runtime, WorkerContext, install_context
    from kd_worker.worker import KDWorker

    teacher = require_model_dir(settings.teacher, "KD_TEACHER")
    student = require_model_dir(settings.student, "KD_STUDENT")
    # TCP keepalive detects a dead peer; a unix socket connection refuses the option (TypeError)
    keepalive = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    conn = Redis.from_url(settings.redis_url, health_check_interval=30, **keepalive)
    runtime, control, started = Runtime(settings), JobControl(), []
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
    worker = KDWorker(queues, conn, control, settings.heartbeat_interval, settings.lost_job_grace,
                      name=settings.worker_name)
    worker.claim_name()
    started.append(worker)
    worker.recover_orphans()
    worker.sweep_lost_jobs()  # first sighting; the heartbeat requeues them a grace period later
    worker.start_heartbeat()
    log.info("worker_started", name=worker.name, queues=worker.queue_names(), teacher=str(teacher), blas=blas.library)
    try:
        while True:
            try:
                worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level.upper())
            except (RedisConnectionError, RedisTimeoutError) as e:
                worker.lost_redis = True
                log.warning("work_loop_redis_error", error=str(e))
            except RedisError as e:
                log.warning("work_loop_redis_error", error=str(e))
            if control.shutting_down or worker._stop_requested or args.burst or args.max_jobs:
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


def cmd_demo(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from kd_worker.demo import run_demo

    return run_demo(settings, Path(args.dir).resolve(), args.iterations, "KD_REDIS_URL" in os.environ)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-worker", description="kd-daemon's worker: distil student LoRA adapters from a "
                                "resident teacher (`run` serves the Redis queue; `distill` runs one job in-process).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("doctor", help="check platform, MLX, BLAS speed, Redis, model dirs, adapters dir")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--strict", action="store_true", help="treat warnings (Redis down, models unset) as failures")
    d.set_defaults(func=cmd_doctor)

    m = sub.add_parser("make-demo-models", help="build the tiny real demo models (teacher, students, quantized)")
    m.add_argument("dir", nargs="?", help="output directory (default: $KD_WORK_DIR/models)")
    m.add_argument("--only", nargs="+", help="build only these fixtures")
    m.set_defaults(func=cmd_make_models)

    x = sub.add_parser("distill", help="run one distillation job in-process (no Redis) and publish the adapter")
    x.add_argument("--domain", required=True, help="neuron name, e.g. memory")
    x.add_argument("--prompts", action="append", metavar="FILE", help='JSONL of {"prompt": ...} or {"messages": [...]}')
    x.add_argument("--corrections", action="append", metavar="FILE", help='JSONL of {"prompt": ..., "response": ...}')
    x.add_argument("--teacher", help="teacher model dir (default KD_TEACHER)")
    x.add_argument("--student", help="student base model dir (default KD_STUDENT)")
    x.add_argument("--set", action="append", metavar="KEY=VALUE", help="KD setting override, e.g. temperature=2.0")
    x.add_argument("--out", help="adapters root (default KD_ADAPTERS_DIR); the domain's directory goes below it")
    x.add_argument("--force", action="store_true", help="publish even if the publish gate finds a regression")
    x.add_argument("--json", action="store_true", help="print the outcome as JSON")
    x.set_defaults(func=cmd_distill)

    r = sub.add_parser("run", help="the daemon: load the teacher once, then train jobs from the Redis queue")
    r.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    r.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    r.set_defaults(func=cmd_run)

    dm = sub.add_parser("demo", help="build tiny models, start Redis + a worker, distil `memory`, show the result")
    dm.add_argument("--dir", default=".kd/demo", help="where the demo models, Redis data, work dir, logs and the plot "
                    "go (the adapter goes to KD_ADAPTERS_DIR, default ./adapters_kd)")
    dm.add_argument("--iterations", type=int, default=200, help="training steps of the demo job")
    dm.set_defaults(func=cmd_demo)

    from kd_worker.service import add_service_parser

    add_service_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o022)  # nothing the worker writes is group/world-writable
    try:
        settings = load_settings()
    except KDError as e:
        print(f"kd-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    blas = ensure_fast_blas(settings.blas_library, settings.openblas_coretype)
    try:
        return args.func(args, settings, blas)
    except KDError as e:
        log.error("command_failed", command=args.command, error=str(e), error_type=type(e).__name__)
        print(f"kd-worker {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
