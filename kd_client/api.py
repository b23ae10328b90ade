"""EGO's API: hand kd-daemon training data from a long-running producer, never losing any.

    from kd_client import KDClient
    kd = KDClient(submitter="ego")
    kd.submit_corrections("memory", [{"prompt": p, "response": fixed}])   # one at a time is fine
    kd.flush()                                                            # e.g. at shutdown

Corrections accumulate durably per domain (an fsynced JSONL file) and become ONE training job
once `accumulate_threshold` have gathered or the oldest is `accumulate_max_age_s` old (or on
flush). When Redis is unreachable a submission is written to a local outbox and delivered on a
later call or flush; a record is always in exactly one place: accumulating, in the outbox, or
in Redis. Deliveries are idempotent (content-addressed job ids), so a crash between delivery
and cleanup cannot train twice. Calls never block for long: a failed connection is not retried
for `retry_backoff_s`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog

from jobs import durable
from jobs.errors import ConfigError, DataError, KDError, StateError
from jobs.models import check_domain
from jobs.publisher import locked, write_json_atomic
from jobs.records import DataKind, Record, data_kind, dump_records, parse_record
from jobs.settings import load_settings
from kd_client import queue as Q
from kd_client.settings import ClientSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Receipt:
    job_id: str | None  # None while spooled
    spooled: bool
    duplicate: bool = False
    spool_file: str | None = None


class KDClient:
    def __init__(
        self,
        settings: ClientSettings | None = None,
        submitter: str = "ego",
        connection: redis.Redis | None = None,
        **overrides: Any,
    ):
        self.settings = settings or load_settings(ClientSettings, **overrides)
        self.submitter = submitter
        self.spool = Path(self.settings.spool_dir)
        for sub in ("accum", "outbox"):
            (self.spool / sub).mkdir(parents=True, exist_ok=True)
        self._given = connection
        self._conn: redis.Redis | None = connection
        self._down_until = 0.0

    # --- public API -----------------------------------------------------------------------------
    def submit(
        self,
        domain: str,
        prompts: Iterable[dict] | None = None,
        corrections: Iterable[dict] | None = None,
        overrides: dict[str, Any] | None = None,
        priority: str = "normal",
        force_publish: bool = False,
        teacher: str | None = None,
        student: str | None = None,
    ) -> Receipt:
        """One job now (or spooled): records are validated before anything is accepted."""
        _domain(domain)
        given: tuple[tuple[DataKind, Iterable[dict] | None], ...] = (("prompts", prompts), ("corrections", corrections))
        parts = [(k, _validated(recs, k)) for k, recs in given if recs]
        if not parts:
            raise DataError("give prompts and/or corrections")
        entry = {
            "domain": domain,
            "overrides": overrides or {},
            "priority": priority,
            "force_publish": force_publish,
            "teacher": teacher,
            "student": student,
            "datasets": [
                {"kind": k, "name": f"{self.submitter}-{k}.jsonl", "data": dump_records(r).decode()} for k, r in parts
            ],
        }
        built = self._job(entry)  # fail fast on bad settings, before anything is spooled
        path = self._write_outbox(entry)
        receipts = self.deliver({path.name: built})
        return receipts.get(path.name, Receipt(None, True, spool_file=str(path)))

    def submit_corrections(self, domain: str, records: Iterable[dict]) -> list[Receipt]:
        """Accumulate corrections; enqueue one job per domain when the threshold or age is reached."""
        _domain(domain)
        valid = _validated(records, "corrections")
        with locked(self.spool / ".lock"):
            acc = self.spool / "accum" / f"{domain}.jsonl"
            with open(acc, "ab") as f:
                f.write(dump_records(valid))
                f.flush()
                durable.fsync(f.fileno())
            since = self.spool / "accum" / f"{domain}.since"
            if not since.exists():
                since.write_text(str(time.time()))
        return self._cut_due(force=False)

    def flush(self) -> list[Receipt]:
        """Turn every accumulation into a job and try to deliver everything spooled."""
        return self._cut_due(force=True)

    def pending(self) -> dict[str, int]:
        """Accumulated corrections per domain and the number of undelivered outbox entries."""
        out = {p.stem: _count_lines(p) for p in (self.spool / "accum").glob("*.jsonl")}
        out["outbox"] = len(list((self.spool / "outbox").iterdir()))
        return out

    def deliver(self, built: dict[str, tuple[Any, list[Q.Dataset]]] | None = None) -> dict[str, Receipt]:
        """Send outbox entries oldest first; stop at the first connection failure (keep the rest).
        `built`: jobs already validated for some entries (by file name), not rebuilt from disk."""
        done: dict[str, Receipt] = {}
        if time.monotonic() < self._down_until:
            return done
        for path in sorted((self.spool / "outbox").iterdir()):
            if path.name.startswith("."):
                continue
            try:
                sub = self._deliver_one(path, (built or {}).get(path.name))
            except StateError as e:  # a Redis key kd-daemon did not write: kept until someone clears it
                self._down_until = time.monotonic() + self.settings.retry_backoff_s
                log.error("kd_redis_state_refused", error=str(e), spooled=str(path))
                if built and path.name in built:  # the caller's own submission: say why it is not queued
                    raise StateError(f"{e}; the submission stays in {path} (kd-client flush delivers it)") from e
                break
            except redis.RedisError as e:  # refused, timed out, auth, not-a-Redis: keep it spooled
                self._down_until = time.monotonic() + self.settings.retry_backoff_s
                self._conn = self._given
                log.warning("kd_redis_unreachable", error=str(e), spooled=str(path))
                break
            except KDError as e:  # cannot succeed later either: set aside, keep the outbox moving
                (self.spool / "rejected").mkdir(exist_ok=True)
                os.replace(path, self.spool / "rejected" / path.name)
                log.error("kd_submission_rejected", file=path.name, error=str(e))
                continue
            path.unlink()
            done[path.name] = Receipt(sub.job_id, False, sub.duplicate)
            log.debug("kd_submitted", job_id=sub.job_id, duplicate=sub.duplicate)
        return done

    # --- internals ------------------------------------------------------------------------------
    def _cut_due(self, force: bool) -> list[Receipt]:
        with locked(self.spool / ".lock"):
            for acc in sorted((self.spool / "accum").glob("*.jsonl")):
                if force or self._due(acc):
                    self._cut(acc)
        return list(self.deliver().values())

    def _due(self, acc: Path) -> bool:
        since = acc.with_suffix(".since")
        age = time.time() - float(since.read_text()) if since.exists() else 0.0
        return _count_lines(acc) >= self.settings.accumulate_threshold or age >= self.settings.accumulate_max_age_s

    def _cut(self, acc: Path) -> None:
        """Accumulation -> outbox with one rename (the records are never in two places)."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-{acc.stem}.corrections.jsonl"
        os.replace(acc, self.spool / "outbox" / name)
        acc.with_suffix(".since").unlink(missing_ok=True)

    def _write_outbox(self, entry: dict[str, Any]) -> Path:
        path = self.spool / "outbox" / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        write_json_atomic(path, entry)  # fsynced before it counts as accepted
        return path

    def _deliver_one(self, path: Path, built: tuple[Any, list[Q.Dataset]] | None = None) -> Q.Submitted:
        if built is not None:
            return Q.submit(self._connection(), self.settings, *built)
        if path.name.endswith(".corrections.jsonl"):
            domain = path.name.split("-", 2)[2].removesuffix(".corrections.jsonl")
            entry = {
                "domain": domain,
                "overrides": {},
                "priority": "normal",
                "force_publish": False,
                "datasets": [
                    {
                        "kind": "corrections",
                        "name": f"{self.submitter}-corrections.jsonl",
                        "data": path.read_text(encoding="utf-8"),
                    }
                ],
            }
        else:
            entry = json.loads(path.read_text(encoding="utf-8"))
        job, datasets = self._job(entry)
        return Q.submit(self._connection(), self.settings, job, datasets)

    def _job(self, entry: dict[str, Any]) -> tuple[Any, list[Q.Dataset]]:
        datasets = [self._dataset(d) for d in entry["datasets"]]
        job = Q.build_job(
            entry["domain"],
            datasets,
            entry["overrides"],
            priority=entry["priority"],
            submitter=self.submitter,
            force_publish=entry["force_publish"],
            teacher=entry.get("teacher"),
            student=entry.get("student"),
        )
        return job, datasets

    def _dataset(self, d: dict[str, str]) -> Q.Dataset:
        return Q.prepare_dataset(data_kind(d["kind"]), d["data"].encode(), d["name"], self.settings.max_data_bytes)

    def _connection(self) -> redis.Redis:
        if self._conn is None:
            self._conn = Q.connect(self.settings)
        return self._conn


def _domain(domain: str) -> None:
    try:
        check_domain(domain)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validated(records: Iterable[dict], kind: DataKind) -> list[Record]:
    out = [parse_record(r, kind, f"{kind} record {i}") for i, r in enumerate(records, start=1)]
    if not out:
        raise DataError(f"no {kind} records given")
    return out


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0
