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
from jobs.records import DataKind
from kd_worker.ops.blas import ensure_fast_blas
from kd_worker.ops.logs import configure_logging
from kd_worker.settings import WorkerSettings, load_settings, require_model_dir, work_dir_alone

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_REJECTED, EXIT_CONFIG = 0, 1, 3, 78  # 78 = EX_CONFIG: do not restart


def default_models_dir(settings: WorkerSettings) -> Path:
    return settings.work_dir / "models"


def cmd_doctor(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from rich.console import Console
    from rich.table import Table

    from kd_worker.ops.doctor import run_checks

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
    from kd_worker.fixtures.tinymodels import ALL_NAMES, build_demo_models

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
    from kd_worker.daemon.lifecycle import run_job
    from kd_worker.daemon.runtime import Runtime
    from kd_worker.engine.types import DistillRequest
    from kd_worker.ops.console import ConsoleProgress

    # one job in this process: it publishes into KD_ADAPTERS_DIR (or --out), never to Redis (`kd-worker run` does)
    settings = settings.model_copy(
        update={"publish_to": "local", **({"adapters_dir": Path(args.out)} if args.out else {})}
    )
    overrides = parse_overrides(args.set or [])
    cfg = resolve_config(settings.kd_defaults, overrides)  # fails fast on a bad --set, before any model loads
    kinds: list[tuple[DataKind, list[str]]] = [("prompts", args.prompts or []), ("corrections", args.corrections or [])]
    data = [(kind, Path(p)) for kind, paths in kinds for p in paths]
    if not data:
        raise KDError("give --prompts FILE and/or --corrections FILE")
    teacher = require_model_dir(Path(args.teacher) if args.teacher else settings.teacher, "--teacher / KD_TEACHER")
    student = require_model_dir(Path(args.student) if args.student else settings.student, "--student / KD_STUDENT")
    ident = json.dumps(
        [args.domain, [(k, _file_sha(p)) for k, p in data], overrides, str(teacher.resolve()), str(student.resolve())],
        sort_keys=True,
    )
    run_id = "cli-" + hashlib.sha256(ident.encode()).hexdigest()[:20]
    req = DistillRequest(args.domain, tuple(data), teacher, student, run_id, force_publish=args.force)
    # with --json, stdout carries only the outcome; progress and phase timings go to the log (stderr)
    with ConsoleProgress(tty=False if args.json else None) as progress:
        outcome = run_job(req, cfg, Runtime(settings), settings, progress)
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
        console.print(
            f"published {outcome['domain']} v{outcome['version']}: {outcome['adapter_path']} ({gate['reason']})"
        )
    else:
        console.print(f"[yellow]not published[/]: {gate['reason']}; rerun with --force to publish anyway")


def cmd_run(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    """The daemon. Exit codes (the service restart rule): 0 after a requested stop (SIGTERM/SIGINT)
    or when --burst/--max-jobs are done, 1 when the work loop ends otherwise, 78 (or --config-error-exit)
    on a bad configuration. Why it stopped is recorded in the work dir (`kd-worker service status`)."""
    from kd_worker.daemon.serve import serve
    from kd_worker.ops import runstate
    from kd_worker.ops.logrotate import LogRotator

    runstate.record(settings.work_dir, runstate.RUNNING, "kd-worker run started")
    rotator = LogRotator().start()  # launchd's log files; a no-op on a journal socket or a TTY
    try:
        code = serve(settings, blas.library, burst=args.burst, max_jobs=args.max_jobs)
    except ConfigError as e:
        return config_exit(settings.work_dir, e, args.config_error_exit)
    except Exception as e:
        runstate.record(settings.work_dir, runstate.FAILED, f"{type(e).__name__}: {e}", EXIT_ERROR)
        raise
    finally:
        rotator.stop()
    if code == EXIT_OK:
        runstate.record(settings.work_dir, runstate.STOPPED, "requested stop (SIGTERM/SIGINT) or its jobs done", code)
    else:
        runstate.record(settings.work_dir, runstate.FAILED, "the work loop ended unexpectedly", code)
    return code


def config_exit(work_dir: Path, error: KDError, code: int) -> int:
    """A configuration error ends `kd-worker run`: say why (stderr, the log, the run-state record), then exit
    with `code` (78 = EX_CONFIG; a supervisor must not restart it until the configuration is fixed)."""
    from kd_worker.ops import runstate

    print(f"kd-worker run: {error}", file=sys.stderr)
    log.error("configuration_error", error=str(error), exit_code=code)
    runstate.record(work_dir, runstate.CONFIG_ERROR, str(error), code)
    return code


def _exit_status(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{value} is not an exit status (0-255)")
    return value


def cmd_demo(args: argparse.Namespace, settings: WorkerSettings, blas) -> int:
    from kd_worker.fixtures.demo import run_demo

    return run_demo(settings, Path(args.dir).resolve(), args.iterations, "KD_REDIS_URL" in os.environ)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-worker",
        description="kd-daemon's worker: distil student LoRA adapters from a "
        "resident teacher (`run` serves the Redis queue; `distill` runs one job in-process).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("doctor", help="check platform, MLX, BLAS speed, Redis, model dirs, adapters dir")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--strict", action="store_true", help="treat warnings (Redis down, models unset) as failures")
    d.set_defaults(func=cmd_doctor)

    m = sub.add_parser("make-demo-models", help="build the tiny real demo models (teacher, students, quantized)")
    m.add_argument("dir", nargs="?", help="output directory (default: $KD_WORK_DIR/models)")
    m.add_argument("--only", nargs="+", help="build only these fixtures")
    m.set_defaults(func=cmd_make_models)

    x = sub.add_parser(
        "distill",
        help="run one distillation job in-process (no Redis) and publish the adapter",
        description="One job in-process, without Redis: no corpus, so no replay and no regression set. By default "
        "(init=current) it starts from the domain's published adapter under --out when it is compatible; "
        "--set init=base trains a fresh LoRA.",
    )
    x.add_argument("--domain", required=True, help="neuron name, e.g. memory")
    x.add_argument("--prompts", action="append", metavar="FILE", help='JSONL of {"prompt": ...} or {"messages": [...]}')
    x.add_argument("--corrections", action="append", metavar="FILE", help='JSONL of {"prompt": ..., "response": ...}')
    x.add_argument("--teacher", help="teacher model dir (default KD_TEACHER)")
    x.add_argument("--student", help="student base model dir (default KD_STUDENT)")
    x.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="KD setting override, e.g. temperature=2.0; on_policy=1.0 trains on the student's own samples "
        "scored by the teacher (rollout_every, rollout_batch, rollout_max_tokens, rollout_temperature, "
        "on_policy_divergence, on_policy_alpha); select=best publishes the validation with the lowest "
        "held-out KL, patience=N stops after N validations without a better one",
    )
    x.add_argument("--out", help="adapters root (default KD_ADAPTERS_DIR); the domain's directory goes below it")
    x.add_argument("--force", action="store_true", help="publish even if the publish gate finds a regression")
    x.add_argument("--json", action="store_true", help="print the outcome as JSON")
    x.set_defaults(func=cmd_distill)

    r = sub.add_parser("run", help="the daemon: load the teacher once, then train jobs from the Redis queue")
    r.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    r.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    r.add_argument(
        "--config-error-exit",
        type=_exit_status,
        default=EXIT_CONFIG,
        metavar="CODE",
        help="exit status after a configuration error (default 78, which systemd's RestartPreventExitStatus "
        "exempts from restarts; the launchd agent passes 0, as launchd restarts every other non-zero exit)",
    )
    r.set_defaults(func=cmd_run)

    dm = sub.add_parser(
        "demo",
        help="train a tiny teacher and student base (once), start Redis + a worker, distil the `digits` domain, "
        "show what the student learned",
    )
    dm.add_argument(
        "--dir",
        default=".kd/demo",
        help="where the demo models, Redis data, work dir, logs and the plot "
        "go (the adapter goes to KD_ADAPTERS_DIR, default ./adapters_kd)",
    )
    dm.add_argument("--iterations", type=int, default=150, help="training steps of the demo job")
    dm.set_defaults(func=cmd_demo)

    from kd_worker.ops.service import add_service_parser

    add_service_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o022)  # nothing the worker writes is group/world-writable
    try:
        settings = load_settings()
    except KDError as e:
        if args.command == "run":  # the daemon records why it stopped, as for any configuration error
            configure_logging()
            return config_exit(work_dir_alone(), e, args.config_error_exit)
        print(f"kd-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    as_json = getattr(args, "json", False) and settings.log_format == "auto"
    configure_logging("json" if as_json else settings.log_format, settings.log_level)  # --json: JSON logs too
    blas = ensure_fast_blas(settings.blas_library, settings.openblas_coretype)
    try:
        return args.func(args, settings, blas)
    except KDError as e:
        log.error("command_failed", command=args.command, error=str(e), error_type=type(e).__name__)
        print(f"kd-worker {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
