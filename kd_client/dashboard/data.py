"""What the dashboard shows, as plain data: functions over `adapters_kd/` (through jobs.publisher)
and Redis (through kd_client.queue). No web framework here; the routes render what these return.

Disk and Redis fail separately: with Redis down the published adapters are still read from disk,
and a `RedisState` says why the queue part is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from jobs import publisher
from jobs.errors import KDError
from jobs.models import check_domain, queue_names
from kd_client import queue as Q
from kd_client.settings import ClientSettings

RECENT_JOBS = 15


@dataclass(frozen=True)
class RedisState:
    url: str  # without its password
    error: str | None = None  # None: reachable

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class VersionRow:
    """One kept version of a domain, from its manifest (no hashing: `verify` is for the selected one)."""

    number: int
    path: Path
    current: bool
    published_at: str | None = None
    job_id: str | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    examples: int | None = None
    error: str | None = None  # an unreadable manifest


@dataclass(frozen=True)
class DomainRow:
    domain: str
    current: VersionRow | None
    trend: list[float]  # held-out KL after training, per kept version, oldest first
    last_rejected: dict[str, Any] | None = None
    rolled_back_from: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class QueueRow:
    priority: str
    name: str
    queued: int
    started: int
    failed: int


@dataclass(frozen=True)
class Overview:
    domains: list[DomainRow]
    redis: RedisState
    workers: list[dict[str, Any]] = field(default_factory=list)
    queues: list[QueueRow] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # most recent first
    disk_error: str | None = None


@dataclass(frozen=True)
class Selected:
    """The version a domain page shows in full: its kd_metrics.json and its manifest check."""

    row: VersionRow
    metrics: dict[str, Any]
    verified: bool
    problem: str | None  # why it did not verify, or why its metrics could not be read


@dataclass(frozen=True)
class DomainPage:
    domain: str
    versions: list[VersionRow]  # newest first
    selected: Selected | None
    samples: list[tuple[VersionRow, list[dict[str, str]]]]  # current version, then the one before it
    summary: dict[str, Any]


@dataclass(frozen=True)
class JobPage:
    row: dict[str, Any]  # kd_client.queue.describe
    waiting: list[str]  # kd_client.queue.waiting_lines while queued
    final: bool
    cancellable: bool


def redacted(url: str) -> str:
    """The Redis URL without credentials (it may carry a password)."""
    p = urlparse(url)
    if p.scheme == "unix":
        return f"unix://{p.path}"
    return f"{p.scheme}://{p.hostname}:{p.port or 6379}{p.path or ''}"


# --- disk: adapters_kd/ through jobs.publisher --------------------------------------------------
def version_row(v: publisher.Version, current: int | None) -> VersionRow:
    try:
        entry = json.loads((v.path / publisher.MANIFEST).read_text())["summary"]
        metrics = entry.get("metrics") or {}
        return VersionRow(
            number=v.number,
            path=v.path,
            current=v.number == current,
            published_at=entry.get("published_at"),
            job_id=entry.get("job_id"),
            before=metrics.get("before") or {},
            after=metrics.get("after") or {},
            gate=entry.get("gate") or {},
            forced=bool(entry.get("forced")),
            examples=(entry.get("data") or {}).get("examples"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return VersionRow(v.number, v.path, v.number == current, error=f"unreadable {publisher.MANIFEST}: {e}")


def version_rows(root: Path, domain: str) -> list[VersionRow]:
    """Every kept version of a domain, newest first."""
    current = publisher.resolve(root, domain)
    number = current.number if current else None
    return [version_row(v, number) for v in reversed(publisher.versions(root, domain))]


def domain_names(root: Path, summary: dict[str, Any]) -> list[str]:
    """Domains in the summary plus any domain directory with versions (a summary may lag or be lost)."""
    names = set(summary.get("domains", {}))
    if Path(root).is_dir():
        names |= {d.name for d in Path(root).iterdir() if (d / "versions").is_dir()}
    return sorted(n for n in names if _valid_domain(n))


def _valid_domain(name: str) -> bool:
    try:
        check_domain(name)
    except ValueError:
        return False
    return True


def domain_row(root: Path, domain: str, entry: dict[str, Any]) -> DomainRow:
    try:
        rows = version_rows(root, domain)
    except KDError as e:
        return DomainRow(domain, None, [], error=str(e))
    current = next((r for r in rows if r.current), None)
    trend = [r.after["kl"] for r in reversed(rows) if _finite(r.after.get("kl"))]
    return DomainRow(domain, current, trend, entry.get("last_rejected"), entry.get("rolled_back_from"))


def read_domains(root: Path) -> tuple[list[DomainRow], str | None]:
    """One row per domain; a corrupt kd_summary.json is reported and the directories are read anyway."""
    try:
        summary, problem = publisher.read_summary(root), None
    except KDError as e:
        summary, problem = {"domains": {}}, str(e)
    entries = summary.get("domains", {})
    return [domain_row(root, d, entries.get(d, {})) for d in domain_names(root, summary)], problem


def read_metrics(version_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((version_dir / publisher.METRICS).read_text())
    except (OSError, ValueError) as e:
        raise KDError(f"cannot read {version_dir / publisher.METRICS}: {e}") from e
    if not isinstance(doc, dict):
        raise KDError(f"{version_dir / publisher.METRICS} is not a JSON object")
    return doc


def select_version(row: VersionRow) -> Selected:
    """The version's manifest checked (sizes and sha256s) and its metrics read."""
    try:
        publisher.verify(row.path)
        verified, problem = True, None
    except KDError as e:
        verified, problem = False, str(e)
    try:
        metrics = read_metrics(row.path)
    except KDError as e:
        metrics, problem = {}, problem or str(e)
    return Selected(row, metrics, verified, problem)


def version_samples(row: VersionRow) -> list[dict[str, str]]:
    try:
        samples = read_metrics(row.path).get("samples") or []
    except KDError:
        return []
    return [s for s in samples if isinstance(s, dict)]


def domain_page(root: Path, domain: str, selected: int | None = None) -> DomainPage | None:
    """A domain's versions, the selected one (default: current) in full, and the samples of the
    current version and the one before it. None when nothing was ever published for it."""
    rows = version_rows(root, domain)
    if not rows:
        return None
    current = next((r for r in rows if r.current), rows[0])
    chosen = next((r for r in rows if r.number == selected), current)
    older = [r for r in rows if r.number < current.number]
    pair = [current] + older[:1]
    try:
        entry = publisher.read_summary(root).get("domains", {}).get(domain, {})
    except KDError:
        entry = {}
    return DomainPage(
        domain,
        rows,
        select_version(chosen),
        [(r, version_samples(r)) for r in pair],
        entry,
    )


def current_samples(root: Path, domain: str) -> tuple[list[dict[str, str]], str | None]:
    """The current version's samples, or why there are none (for `kd-client summary --samples`)."""
    current = publisher.resolve(root, domain)
    if current is None:
        return [], f"nothing published for {domain}"
    try:
        samples = read_metrics(current.path).get("samples")
    except KDError as e:
        return [], str(e)
    if not samples:
        return [], f"v{current.number} has no samples (published before samples were kept, or samples=0)"
    return [s for s in samples if isinstance(s, dict)], None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# --- Redis: through kd_client.queue --------------------------------------------------------------
def queue_rows(conn: redis.Redis, settings: ClientSettings) -> list[QueueRow]:
    rows = []
    for priority, name in queue_names(settings.queue).items():
        kw: dict[str, Any] = {"connection": conn, "serializer": JSONSerializer}
        rows.append(
            QueueRow(
                priority,
                name,
                Queue(name, **kw).count,
                StartedJobRegistry(name, **kw).count,
                FailedJobRegistry(name, **kw).count,
            )
        )
    return rows


def overview(root: Path, conn: redis.Redis, settings: ClientSettings) -> Overview:
    """Domains from disk, always; workers, queues and recent jobs when Redis answers."""
    domains, disk_error = read_domains(root)
    state = RedisState(redacted(settings.redis_url))
    try:
        workers = Q.workers(conn)
        queues = queue_rows(conn, settings)
        jobs = list(reversed(Q.list_jobs(conn, settings)))[:RECENT_JOBS]
    except redis.RedisError as e:
        return Overview(domains, RedisState(state.url, f"{type(e).__name__}: {e}"), disk_error=disk_error)
    return Overview(domains, state, workers, queues, jobs, disk_error)


def job_page(conn: redis.Redis, settings: ClientSettings, job_id: str) -> JobPage | None:
    """A job's state, progress and outcome; while it waits, its place in the queue and its workers.
    None when Redis has no such job. Raises redis.RedisError when Redis is unreachable."""
    job = Q.fetch(conn, job_id)
    if job is None:
        return None
    row = Q.describe(job)
    status = job.get_status(refresh=False)
    lines = Q.waiting_lines(Q.waiting(conn, settings, job)) if status in Q.WAITING else []
    return JobPage(row, lines, row["status"] in Q.FINAL, status in Q.WAITING or row["status"] == "started")
