"""The job payload shared by producers (kd_client, EGO) and the worker.

JSON only, validated on both sides, versioned. Training data never travels inside the payload:
the producer stores the JSONL bytes once as a content-addressed blob in Redis (key
`kd:blob:<sha256>`) and the job names it by sha256 + record count + size. This works when
producer and worker share no filesystem (several Macs on one Redis); the worker re-checks the
sha256 before it reads a single record.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from jobs.errors import ConfigError

SCHEMA_VERSION = 1
TASK_FUNC = "kd_worker.daemon.task.run_kd_job"
ALLOWED_TASKS = frozenset({TASK_FUNC})
DOMAINS = ("thinking", "task", "action", "reflection", "debug", "memory")
PRIORITIES = ("high", "normal", "low")

_DOMAIN_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_domain(value: str) -> str:
    if not isinstance(value, str) or not _DOMAIN_RE.fullmatch(value):
        raise ValueError(
            f"domain {value!r} is not allowed: use 1-32 characters, lower-case letters, digits and '_', "
            f"starting with a letter (e.g. {', '.join(DOMAINS)})"
        )
    return value


def check_model_name(value: str | None) -> str | None:
    # A job may only name a model under the worker's models root: a bare directory name.
    if value is not None and not _MODEL_NAME_RE.fullmatch(value):
        raise ValueError(f"model name {value!r} must be a directory name under the worker's models root (no '/')")
    return value


Domain = Annotated[str, AfterValidator(check_domain)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DataRef(BaseModel):
    """One JSONL file of records, stored as a blob in Redis under its sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["prompts", "corrections"]
    sha256: Sha256
    records: Annotated[int, Field(ge=1)]
    size: Annotated[int, Field(ge=1)]
    name: Annotated[str, Field(max_length=200)] = "data.jsonl"


class KDJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = SCHEMA_VERSION
    domain: Domain
    data: Annotated[tuple[DataRef, ...], Field(min_length=1, max_length=8)]
    overrides: dict[str, Any] = Field(default_factory=dict)
    teacher: Annotated[str | None, AfterValidator(check_model_name)] = None
    student: Annotated[str | None, AfterValidator(check_model_name)] = None
    priority: Literal[PRIORITIES] = "normal"
    submitter: Annotated[str, Field(max_length=100)] = "kd-client"
    force_publish: bool = False
    submitted_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    def dedup_key(self) -> str:
        """Same domain + same data + same settings + same models: the same training run."""
        ident = {
            "domain": self.domain,
            "data": sorted((d.kind, d.sha256) for d in self.data),
            "overrides": self.overrides,
            "teacher": self.teacher,
            "student": self.student,
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return f"kd-{self.domain}-{digest[:20]}"


def parse_job(payload: Any) -> KDJob:
    """Validate a payload from Redis; a newer schema or any bad field is a ConfigError."""
    if isinstance(payload, dict):
        version = payload.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ConfigError(
                f"job schema_version {version} is newer than this worker supports ({SCHEMA_VERSION}); "
                "upgrade kd-daemon on the worker"
            )
    try:
        return KDJob.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'job'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid job payload: {problems}") from e


def queue_names(base: str) -> dict[str, str]:
    """Priority -> rq queue name; a worker listens to them in this order."""
    return {"high": f"{base}:high", "normal": base, "low": f"{base}:low"}


def blob_key(sha256: str) -> str:
    return f"kd:blob:{sha256}"


# Redis keys shared by producers and workers (names only; the clients live on each side).
def seq_key(domain: str) -> str:
    """INCR counter: submission tickets of a domain (publish order)."""
    return f"kd:seq:{domain}"


def active_key(domain: str) -> str:
    """Sorted set job_id -> ticket of the domain's submitted, not yet settled jobs."""
    return f"kd:active:{domain}"


def published_key(domain: str) -> str:
    """Highest ticket published for the domain (an older job never replaces a newer one)."""
    return f"kd:published:{domain}"


def cancel_key(job_id: str) -> str:
    return f"kd:cancel:{job_id}"


def health_key(worker_name: str) -> str:
    return f"kd:health:{worker_name}"


# The continual loop's per-domain memory (kd_client.corpus reads and writes these; jobs.corpus is the record).
def corpus_key(domain: str) -> str:
    """Hash example key -> CorpusRecord JSON: the domain's examples, each stored once."""
    return f"kd:corpus:{domain}"


def corpus_order_key(domain: str) -> str:
    """Sorted set example key -> insertion sequence number (oldest first)."""
    return f"kd:corpus:{domain}:order"


def corpus_held_out_key(domain: str) -> str:
    """Set of the example keys some job held out: never replayed."""
    return f"kd:corpus:{domain}:held_out"


def corpus_meta_key(domain: str) -> str:
    """Hash of counters: seq (last sequence number), bytes (stored record bytes), offered (examples
    offered to the regression reservoir so far)."""
    return f"kd:corpus:{domain}:meta"


def regression_key(domain: str) -> str:
    """Hash reservoir slot -> example key: the regression set of the domain's publish gate."""
    return f"kd:regression:{domain}"
