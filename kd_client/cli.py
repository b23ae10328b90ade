"""`kd-client`: submit distillation jobs and follow them. Talks to Redis only (and reads the
local adapters directory for `summary`, `rollback`, `follow`, `serve`; `sync` writes it from
Redis); never imports the worker."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from jobs.config import parse_overrides
from jobs.errors import KDError
from jobs.models import DOMAINS, PRIORITIES, check_job_id
from jobs.records import DataKind, read_records
from kd_client.cli_data import add_data_parser  # kd-client data: the domain corpus
from kd_client.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_NOT_PUBLISHED, EXIT_OK, EXIT_SPOOLED, EXIT_STOPPED
from kd_client.queue import check_data_size


def exit_code(row: dict[str, Any]) -> int:
    status = row.get("status")
    if status == "failed":
        return EXIT_FAILED
    if status in ("stopped", "canceled"):
        return EXIT_STOPPED
    if status == "finished" and not (row.get("outcome") or {}).get("published", False):
        return EXIT_NOT_PUBLISHED
    return EXIT_OK


def _records(path: str, kind: DataKind, max_bytes: int | None = None) -> list[dict]:
    """The records of a JSONL file; the size limit applies to the file as given (padding counts)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KDError(f"cannot read {path}: {e.strerror}") from e
    if max_bytes is not None:
        check_data_size(data, path, max_bytes)
    return [r.model_dump(exclude_none=True) for r in read_records(data, kind, Path(path).name)]


def _sample(domain: str) -> str:
    return str(resources.files("jobs").joinpath("samples", f"{domain}.jsonl"))


def cmd_submit(args, settings) -> int:
    from kd_client.api import KDClient

    client = KDClient(settings, submitter=args.submitter)
    domains = list(DOMAINS) if args.all_domains else [args.domain]
    if not args.all_domains and not args.domain:
        raise KDError("give --domain D (or --all-domains)")
    overrides = parse_overrides(args.set or [])
    limit = settings.max_data_bytes
    given = [r for f in args.prompts or [] for r in _records(f, "prompts", limit)]  # read once, not per domain
    corrections = [r for f in args.corrections or [] for r in _records(f, "corrections", limit)]
    code, receipts = EXIT_OK, []
    for domain in domains:
        prompts = given or (_records(_sample(domain), "prompts") if args.all_domains else [])
        rec = client.submit(
            domain,
            prompts or None,
            corrections or None,
            overrides,
            args.priority,
            args.force,
            args.teacher,
            args.student,
        )
        receipts.append({"domain": domain, **rec.__dict__})
        if rec.spooled:
            code = EXIT_SPOOLED
    for r in receipts:
        if args.json:
            continue
        if r["spooled"]:
            print(f"{r['domain']}: Redis unreachable; spooled to {r['spool_file']} (delivered by `kd-client flush`)")
        else:
            print(f"{r['job_id']}{'  (duplicate of an existing job)' if r['duplicate'] else ''}")
    if args.json:
        print(json.dumps(receipts, indent=2))
    if args.wait and code == EXIT_OK:
        return max(watch(settings, r["job_id"], quiet=args.json) for r in receipts)
    return code


def cmd_status(args, settings) -> int:
    from kd_client import queue as Q

    job = Q.fetch(Q.connect(settings), args.job)
    if job is None:
        raise KDError(f"no job {args.job!r} (finished jobs are kept for KD_RESULT_TTL seconds)")
    row = Q.describe(job)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
    else:
        progress = row.get("progress") or {}
        print(
            f"{row['id']}  {row['status']}  domain={row['domain']}  phase={progress.get('phase', '-')} "
            f"{progress.get('step', '')}/{progress.get('total', '')}"
        )
        if row.get("outcome"):
            o = row["outcome"]
            print(f"published={o.get('published')} version={o.get('version')} gate={o.get('gate', {}).get('reason')}")
        if row.get("error"):
            print(f"error: {row['error']}")
    return exit_code(row)


def cmd_list(args, settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from kd_client import queue as Q

    rows = Q.list_jobs(Q.connect(settings), settings, set(args.state) if args.state else None)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    table = Table(title=f"kd jobs ({len(rows)})")
    for col in ("job", "domain", "status", "progress", "enqueued", "result"):
        table.add_column(col)
    for r in rows:
        p = r.get("progress") or {}
        result = r.get("error") or (f"v{r['outcome'].get('version')}" if r.get("outcome") else "")
        table.add_row(
            r["id"],
            r["domain"] or "",
            r["status"] or "",
            f"{p.get('phase', '')} {p.get('step', '')}/{p.get('total', '')}",
            r["enqueued_at"] or "",
            result[:60],
        )
    Console().print(table)
    return EXIT_OK


def watch(settings, job_id: str, quiet: bool = False, poll_s: float = 0.5) -> int:
    """Live progress until the job ends; the exit code reflects the outcome."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kd_client import queue as Q

    conn = Q.connect(settings)
    bar = Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=quiet,
    )
    tasks: dict[str, Any] = {}
    said: list[str] = []
    with bar:
        while True:
            job = Q.fetch(conn, job_id)
            if job is None:
                raise KDError(f"no job {job_id!r}")
            row = Q.describe(job)
            if not quiet and job.get_status(refresh=False) in Q.WAITING:
                lines = Q.waiting_lines(Q.waiting(conn, settings, job))
                if lines != said:  # said again only when the place or the workers change
                    for line in lines:
                        bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
                    said = lines
            p = row.get("progress") or {}
            if p.get("phase"):
                if p["phase"] not in tasks:
                    tasks[p["phase"]] = bar.add_task(p["phase"], total=max(p.get("total") or 1, 1), info="")
                info = " ".join(f"{k}={v:.3f}" for k, v in (p.get("metrics") or {}).items())
                bar.update(tasks[p["phase"]], completed=p.get("step", 0), info=info)
            if row["status"] in Q.FINAL:
                break
            time.sleep(poll_s)  # polling interval of a progress display
    if not quiet:
        o = row.get("outcome") or {}
        if row["status"] == "finished":
            print(
                f"{job_id}: finished; published={o.get('published')} version={o.get('version')} "
                f"path={o.get('adapter_path')} ({(o.get('gate') or {}).get('reason')})"
            )
        else:
            print(f"{job_id}: {row['status']}: {row.get('error', '')}", file=sys.stderr)
    return exit_code(row)


def cmd_watch(args, settings) -> int:
    return watch(settings, args.job)


def cmd_cancel(args, settings) -> int:
    from kd_client import queue as Q

    print(f"{args.job}: {Q.cancel(Q.connect(settings), args.job)}")
    return EXIT_OK


def cmd_workers(args, settings) -> int:
    from kd_client import queue as Q

    rows = Q.workers(Q.connect(settings))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for w in rows:
            print(
                f"{w['name']}  {w['state']}  job={w.get('job_id') or '-'}  pid={w['pid']}@{w['host']}  "
                f"heartbeat {w['age_s']}s ago"
            )
        if not rows:
            print("no live workers")
    return EXIT_OK


def cmd_summary(args, settings) -> int:
    from jobs.publisher import read_summary

    summary = read_summary(settings.adapters_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    for domain, e in sorted(summary.get("domains", {}).items()):
        after = (e.get("metrics") or {}).get("after", {})
        print(
            f"{domain:12s} v{e.get('version')}  kl={after.get('kl', float('nan')):.4f}  "
            f"published {e.get('published_at')}  gate: {(e.get('gate') or {}).get('reason')}"
        )
        if rejected := e.get("last_rejected"):
            print(
                f"{'':12s} last rejected: job {rejected.get('job_id')} ({rejected.get('at')}): {rejected.get('reason')}"
            )
        if args.samples:
            print_samples(settings.adapters_dir, domain)
    return EXIT_OK


def print_samples(root: Path, domain: str) -> None:
    """The current version's held-out samples (kd_metrics.json): prompt, teacher, before, after."""
    from kd_client.dashboard.data import current_samples

    samples, problem = current_samples(root, domain)
    if problem:
        print(f"  ({problem})")
    for i, sample in enumerate(samples, start=1):
        print(f"  sample {i}")
        for key in ("prompt", "teacher", "before", "after"):
            text = sample.get(key, "").replace("\n", "\n" + " " * 14)
            print(f"    {key + ':':9s} {text}")


def cmd_rollback(args, settings) -> int:
    """Local versions (KD_PUBLISH_TO=local), or the pointer in Redis that every consumer follows (redis,
    both, or a consumer with KD_ADAPTERS_SOURCE=redis), then this machine's directory from it."""
    from kd_client import mirror
    from kd_client.queue import connect

    _, lines = mirror.rollback(settings, lambda: connect(settings), args.domain, args.to)
    for line in lines:
        print(line)
    return EXIT_OK


def cmd_sync(args, settings) -> int:
    """Mirror the versions published in Redis into a local adapters directory (once, or --follow)."""
    import signal
    import threading

    from kd_client import mirror

    root = Path(args.adapters) if args.adapters else settings.adapters_dir
    m = mirror.Mirror.from_settings(settings, root, args.domains)
    if not args.follow:
        results = m.sync_once()
        for r in results:
            print(mirror.describe(r))
        if not results:
            print("nothing is published in Redis")
        return EXIT_FAILED if any(r.action == "failed" for r in results) else EXIT_OK
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shown: dict[str, tuple[bool, int | None, str | None]] = {}

    def report(results: list[mirror.SyncResult]) -> None:
        for r in results:
            key = (r.action == "failed", r.version, r.error)  # each change once, not once per pass
            if shown.get(r.domain) != key:
                shown[r.domain] = key
                print(mirror.describe(r), flush=True)

    m.follow(stop, report)
    return EXIT_OK


def cmd_flush(args, settings) -> int:
    from kd_client.api import KDClient

    client = KDClient(settings, submitter=args.submitter)
    for r in client.flush():
        print(r.job_id)
    left = client.pending()
    print(f"still spooled: {left['outbox']} submission(s)")
    return EXIT_SPOOLED if left["outbox"] else EXIT_OK


def cmd_follow(args, settings) -> int:
    """Reference cortex consumer: hold a model, hot-swap each published adapter, answer a prompt."""
    from kd_client.follow import describe, follow
    from kd_client.mirror import Mirror

    from_redis = settings.adapters_source == "redis"
    try:
        follow(
            settings.adapters_dir,
            args.domain,
            Path(args.model),
            args.prompt or _first_prompt(args.domain),
            max_tokens=args.max_tokens,
            force_polling=args.poll or None,
            max_swaps=args.max_swaps,
            on_event=lambda e: print(describe(e), flush=True),
            mirror=Mirror.from_settings(settings, settings.adapters_dir, [args.domain]) if from_redis else None,
        )
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_serve(args, settings) -> int:
    """The OpenAI-compatible endpoint of the neurons (kd_client/serve.py), until SIGINT/SIGTERM."""
    import logging

    import structlog

    from jobs.errors import ConfigError
    from kd_client.serve import serve

    renderer = structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    try:
        serve(args.model, args.adapters or str(settings.adapters_dir), args.host, args.port, settings)
    except ConfigError as e:
        print(f"kd-client serve: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _first_prompt(domain: str) -> str:
    path = Path(_sample(domain))
    if not path.is_file():
        raise KDError(f"no bundled prompts for {domain!r}; give --prompt")
    return _records(str(path), "prompts")[0]["prompt"]


def job_id_arg(value: str) -> str:
    try:
        return check_job_id(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_dashboard(args, settings) -> int:
    """Serve the web dashboard (kd_client.dashboard) until interrupted."""
    import uvicorn

    from kd_client.dashboard.app import create_app
    from kd_client.dashboard.security import is_loopback

    token = "set" if settings.dashboard_token else "disabled: set KD_DASHBOARD_TOKEN to enable them"
    if not is_loopback(args.host):
        print(f"kd-client dashboard: WARNING: {args.host} is not loopback; the pages are visible to the network")
    print(f"kd-client dashboard: http://{_url_host(args.host)}:{args.port}/  (rollback/cancel: {token})", flush=True)
    uvicorn.run(create_app(settings, bind_host=args.host), host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-client", description="Submit kd-daemon distillation jobs and follow them.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="queue a distillation job (spooled locally if Redis is unreachable)")
    s.add_argument("--domain", help="neuron name, e.g. memory")
    s.add_argument(
        "--all-domains",
        action="store_true",
        help="one job per bundled domain, with its sample prompts unless --prompts is given",
    )
    s.add_argument("--prompts", action="append", metavar="FILE", help='JSONL of {"prompt": ...} or {"messages": [...]}')
    s.add_argument("--corrections", action="append", metavar="FILE", help='JSONL of {"prompt": ..., "response": ...}')
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="KD setting override, e.g. iterations=100, on_policy=1.0 (train on the student's own samples "
        "scored by the teacher), select=best patience=2 (publish the best validation, stop early)",
    )
    s.add_argument("--priority", choices=PRIORITIES, default="normal")
    s.add_argument("--teacher", help="teacher model directory name under the worker's KD_MODELS_ROOT")
    s.add_argument("--student", help="student model directory name under the worker's KD_MODELS_ROOT")
    s.add_argument("--force", action="store_true", help="publish even if the publish gate finds a regression")
    s.add_argument("--submitter", default="kd-client")
    s.add_argument(
        "--wait", action="store_true", help="follow the job until it ends, as `watch` does (exit code = outcome)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_submit)

    for name, fn, helptext in (
        ("status", cmd_status, "one job's state, progress and outcome"),
        ("watch", cmd_watch, "live progress until the job ends; while queued, its place and the workers serving it"),
        ("cancel", cmd_cancel, "cancel a queued job, or stop a running one at its next step"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("job", type=job_id_arg, help="job id (printed by submit)")
        if name == "status":
            c.add_argument("--json", action="store_true")
        c.set_defaults(func=fn)

    ls = sub.add_parser("list", help="jobs in all states (queued, started, finished, failed, stopped, canceled)")
    ls.add_argument(
        "--state",
        action="append",
        choices=("queued", "started", "deferred", "scheduled", "finished", "failed", "stopped", "canceled"),
    )
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    w = sub.add_parser("workers", help="live workers (health keys) and their current jobs")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_workers)

    sm = sub.add_parser("summary", help="the published adapters (adapters_kd/kd_summary.json)")
    sm.add_argument("--json", action="store_true")
    sm.add_argument(
        "--samples",
        action="store_true",
        help="also print each current version's held-out samples: prompt, teacher, student before and after",
    )
    sm.set_defaults(func=cmd_summary)

    rb = sub.add_parser(
        "rollback",
        help="point a domain back at an earlier published version",
        description="Moves adapters_dir's `current` (KD_PUBLISH_TO=local), or the domain's pointer in Redis that "
        "every `kd-client sync` follows (KD_PUBLISH_TO=redis|both, or KD_ADAPTERS_SOURCE=redis), then this "
        "machine's adapters_dir from it (not with KD_PUBLISH_TO=redis).",
    )
    rb.add_argument("--domain", required=True)
    rb.add_argument("--to", type=int, help="version number (default: the one before the current)")
    rb.set_defaults(func=cmd_rollback)

    sy = sub.add_parser(
        "sync",
        help="mirror the adapter versions published in Redis into a local adapters directory",
        description="Installs each domain's current version from Redis (workers with KD_PUBLISH_TO=redis|both push "
        "them) into the publisher's layout: staged, every file checked against the manifest the pointer names, "
        "renamed into versions/NNNN with the source's number, then `current` swapped. A version held already is "
        "pointed to (a rollback). A corrupt or partial transfer is never installed. --follow wakes on each "
        "publish (Redis pub/sub) and re-reads the pointers every KD_SYNC_POLL_S seconds.",
    )
    sy.add_argument("--adapters", help="the local adapters directory (default: KD_ADAPTERS_DIR, adapters_kd)")
    sy.add_argument("--domains", nargs="+", metavar="DOMAIN", help="only these domains (default: every published one)")
    sy.add_argument("--follow", action="store_true", help="keep mirroring until SIGINT/SIGTERM")
    sy.set_defaults(func=cmd_sync)

    add_data_parser(sub, watch)

    fl = sub.add_parser(
        "flush", help="enqueue accumulated corrections now and deliver submissions spooled while Redis was unreachable"
    )
    fl.add_argument("--submitter", default="kd-client")
    fl.set_defaults(func=cmd_flush)

    fo = sub.add_parser("follow", help="hold a model, hot-swap each published adapter of a domain, answer a prompt")
    fo.add_argument("--domain", required=True)
    fo.add_argument("--model", required=True, help="the student base model directory")
    fo.add_argument("--prompt", help="asked after every swap (default: the domain's first bundled prompt)")
    fo.add_argument("--max-tokens", type=int, default=64)
    fo.add_argument("--poll", action="store_true", help="force polling (network filesystems)")
    fo.add_argument("--max-swaps", type=int, help="exit after this many swaps")
    fo.set_defaults(func=cmd_follow)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible endpoint: one resident student base, every published domain's adapter, hot-reloaded",
        description="POST /v1/chat/completions and /v1/completions (model = a domain or 'base'), GET /v1/models, "
        "GET /health. Each response names the adapter version it came from (header X-KD-Adapter, field kd). "
        "Binding beyond loopback requires KD_SERVE_API_KEY (sent as 'Authorization: Bearer ...').",
    )
    sv.add_argument("--model", required=True, help="the student base model directory (the adapters' base)")
    sv.add_argument("--adapters", help="the published adapters directory (default: KD_ADAPTERS_DIR, adapters_kd)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.set_defaults(func=cmd_serve)

    db = sub.add_parser(
        "dashboard",
        help="web dashboard: domains, versions, loss curves, samples, queue, workers; rollback and cancel",
    )
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    db.add_argument("--port", type=int, default=8741)
    db.set_defaults(func=cmd_dashboard)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog
    from redis import RedisError

    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),  # stdout is for results
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    args = build_parser().parse_args(argv)
    from jobs.settings import load_settings
    from kd_client.settings import ClientSettings

    try:
        settings = load_settings(ClientSettings)
    except KDError as e:
        print(f"kd-client: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return args.func(args, settings)
    except KDError as e:
        print(f"kd-client {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, RedisError) as e:
        print(f"kd-client {args.command}: cannot reach Redis or a file: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
