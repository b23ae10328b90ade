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
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from jobs.errors import ConfigError, StateError
from jobs.records import DataKind

SCHEMA_VERSION = 1
TASK_FUNC = "kd_worker.daemon.task.run_kd_job"
# The entry point's name before the package split (kd-daemon 0.1): jobs already queued under it when
# a worker is upgraded still run (kd_worker/task.py re-exports the one entry point).
LEGACY_TASK_FUNCS = ("kd_worker.task.run_kd_job",)
ALLOWED_TASKS = frozenset({TASK_FUNC, *LEGACY_TASK_FUNCS})
DOMAINS = ("thinking", "task", "action", "reflection", "debug", "memory")
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)

_DOMAIN_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_JOB_ID_RE = re.compile(r"kd-[a-z][a-z0-9_]{0,31}-[0-9a-f]{20}")  # KDJob.dedup_key


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


def check_job_id(value: str) -> str:
    """A job id as `KDJob.dedup_key` makes them (what `kd-client submit` prints)."""
    if not isinstance(value, str) or not _JOB_ID_RE.fullmatch(value):
        raise ValueError(
            f"job id {value!r} is not a kd-daemon job id: they look like kd-memory-0123456789abcdef0123 "
            "(printed by `kd-client submit`, listed by `kd-client list`)"
        )
    return value


Domain = Annotated[str, AfterValidator(check_domain)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DataRef(BaseModel):
    """One JSONL file of records, stored as a blob in Redis under its sha256."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: DataKind
    sha256: Sha256
    records: Annotated[StrictInt, Field(ge=1)]
    size: Annotated[StrictInt, Field(ge=1)]
    name: Annotated[str, Field(max_length=200)] = "data.jsonl"


class KDJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: StrictInt = SCHEMA_VERSION  # "2" or 2.0 is not a version: no coercion
    domain: Domain
    data: Annotated[tuple[DataRef, ...], Field(min_length=1, max_length=8)]
    overrides: dict[str, Any] = Field(default_factory=dict)
    teacher: Annotated[str | None, AfterValidator(check_model_name)] = None
    student: Annotated[str | None, AfterValidator(check_model_name)] = None
    priority: Priority = "normal"
    submitter: Annotated[str, Field(max_length=100)] = "kd-client"
    force_publish: StrictBool = False  # "yes" must not become True
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
        if type(version) is int and version > SCHEMA_VERSION:
            raise ConfigError(
                f"job schema_version {version} is newer than this worker supports ({SCHEMA_VERSION}); "
                "upgrade kd-daemon on the worker"
            )
    try:
        return KDJob.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'job'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid job payload: {problems}") from e


class JobMeta(BaseModel):
    """job.meta exactly as kd_client.queue.submit writes it (ticket, domain, submitter), plus the
    progress the worker itself adds while the job runs. Anything else was not written by kd-daemon."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    ticket: Annotated[int, Field(ge=1)]
    domain: Domain
    submitter: Annotated[str, Field(max_length=100)]
    progress: dict[str, Any] | None = None


def parse_meta(meta: Any) -> JobMeta:
    """Validate a job's meta from Redis; anything the client could not have written is a ConfigError."""
    try:
        return JobMeta.model_validate(meta)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'meta'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid job meta: {problems}; submit through kd-client/KDClient") from e


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
    """Holds the run id (`run_id`) a cancel applies to: a later submission of the job is not canceled."""
    return f"kd:cancel:{job_id}"


def run_id(job_id: str, ticket: int) -> str:
    """One submission of a job: names its run directory, and the run a cancel applies to."""
    return f"{job_id}-{ticket}"


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


# Published versions in Redis (KD_PUBLISH_TO=redis|both; kd_client/mirror.py owns the layout). Files are
# content-addressed blobs, shared by versions and domains, counted in kd:pub:refs and deleted at zero.
PUB_CHANNEL = "kd:pub:changed"  # PUBLISH <domain> after every pointer move: consumers wake up
PUB_DOMAINS_KEY = "kd:pub:domains"  # set of domains with a pointer
PUB_REFS_KEY = "kd:pub:refs"  # hash blob sha256 -> retained versions that reference it


def pub_blob_key(sha256: str) -> str:
    """A chunk of a file (at most 4 MiB) or a manifest, under its own sha256."""
    return f"kd:pub:blob:{sha256}"


def pub_current_key(domain: str) -> str:
    """JSON {"version", "manifest_sha256"}: the domain's current version, moved atomically."""
    return f"kd:pub:current:{domain}"


def pub_versions_key(domain: str) -> str:
    """Hash version -> JSON record (manifest sha256, each file's chunks) of the retained versions."""
    return f"kd:pub:versions:{domain}"


def pub_seq_key(domain: str) -> str:
    """Highest version number reserved for the domain: one numbering for every worker."""
    return f"kd:pub:seq:{domain}"


def pub_key_types(domain: str) -> dict[str, str]:
    """The Redis type of each published-versions key of a domain (and the shared ones)."""
    return {
        pub_current_key(domain): "string",
        pub_versions_key(domain): "hash",
        pub_seq_key(domain): "string",
        PUB_DOMAINS_KEY: "set",
        PUB_REFS_KEY: "hash",
    }


def domain_key_types(domain: str) -> dict[str, str]:
    """The Redis type (as TYPE reports it) of each key kd-daemon keeps for a domain ("none": absent)."""
    return {seq_key(domain): "string", active_key(domain): "zset", published_key(domain): "string"}


def check_key_types(found: dict[str, str], expected: dict[str, str]) -> None:
    """StateError naming every key whose type (from Redis TYPE) is not what kd-daemon writes there."""
    wrong = {k: t for k, t in found.items() if t not in ("none", expected[k])}
    if wrong:
        listed = ", ".join(f"{k} holds a {t}, not a {expected[k]}" for k, t in wrong.items())
        raise StateError(
            f"Redis key {listed}: kd-daemon did not write it; delete it (redis-cli DEL {' '.join(wrong)}) and retry"
        )
