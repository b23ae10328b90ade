"""The job contract on the worker's side: the raw rq job hash, as read from Redis, must be exactly
what kd_client.queue.submit writes (plus what rq's own bookkeeping adds to such a job), checked
before rq deserialises, inflates or resolves anything in it.

rq acts on more of a job than its function: callbacks named by the job are imported and called,
webhooks are POSTed, dependencies, repeats and rate limits change what runs when, and `data` and
`exc_info` are inflated with plain zlib (a 0.4 MB blob inflated to 1.3 GB). A kd-client job has
none of these: every field here is allow-listed with its type, sizes are checked on the raw bytes
and data is inflated with a bound; the data is the one allow-listed task with exactly one
`payload` keyword; meta is kd-client's (jobs.models.JobMeta). A hash that fails is refused with a
typed error (`JobRefused`) and the worker records it as failed (kd_worker.daemon.worker).
"""

from __future__ import annotations

import re
import traceback
import zlib
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now, str_to_date

from jobs import jsonsafe
from jobs.errors import ConfigError, KDError, SecurityError, StateError
from jobs.models import ALLOWED_TASKS, parse_meta

MAX_FIELDS = 40
MAX_FIELD_BYTES = 1 << 20  # any one field, checked in Redis before HGETALL brings it here
DATA_COMPRESSED, DATA_INFLATED = 64 << 10, 256 << 10  # a kd-client job names its data by sha256: a few KB
EXC_INFLATED = 8 << 20  # a traceback a previous run left
META_BYTES, TEXT_CHARS = 64 << 10, 1000
_QUEUE = re.compile(r"[A-Za-z0-9._-]{1,100}(:high|:low)?")
_INT = re.compile(r"-?[0-9]{1,12}")

# Fields rq acts on that a kd-client job never has: their presence alone refuses the job.
SIDE_CHANNELS = (
    "webhooks",
    "dependency_id",
    "dependency_ids",
    "allow_dependency_failures",
    "repeats_left",
    "repeat_intervals",
    "rate_limit_key",
    "rate_limit_concurrency",
    "success_callback_timeout",
    "failure_callback_timeout",
    "stopped_callback_timeout",
)
CALLBACKS = ("success_callback_name", "failure_callback_name", "stopped_callback_name")

# One Redis round trip, atomic: refuse oversized hashes and fields before HGETALL reads them.
_BOUNDED_HGETALL = """
local fields = redis.call('HKEYS', KEYS[1])
if #fields > tonumber(ARGV[1]) then return {0, 'fields', #fields} end
local out = {1}
for _, f in ipairs(fields) do
  local n = redis.call('HSTRLEN', KEYS[1], f)
  if n > tonumber(ARGV[2]) then return {0, f, n} end
  table.insert(out, f)
  table.insert(out, redis.call('HGET', KEYS[1], f))
end
return out
"""


class JobRefused(Exception):
    """A job hash outside the contract. `error` is what the submitter sees; `fields` the raw hash
    (None when the key is not a hash at all: nothing can be recorded there)."""

    def __init__(self, job_id: str, error: KDError, fields: dict[str, bytes] | None):
        super().__init__(str(error))
        self.job_id, self.error, self.fields = job_id, error, fields


def inflate(blob: bytes, limit: int) -> bytes:
    """zlib-inflate at most `limit` bytes; ValueError if the blob is not one whole zlib stream or
    would inflate past the limit (checked while inflating, never after)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(blob, limit + 1)
    except zlib.error as e:
        raise ValueError(f"not zlib-compressed ({e})") from e
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(f"inflates past {limit:,} bytes")
    if not d.eof or d.unused_data:
        raise ValueError("not one whole zlib stream")
    return out


# --- field validators: raw bytes -> value, ValueError with the reason --------------------------------
def _int(lo: int, hi: int) -> Callable[[bytes], int]:
    def check(raw: bytes) -> int:
        text = raw.decode("ascii", "replace")
        if not _INT.fullmatch(text) or not lo <= int(text) <= hi:
            raise ValueError(f"{text[:40]!r} is not an integer in [{lo}, {hi}]")
        return int(text)

    return check


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8")
    if len(text) > TEXT_CHARS:
        raise ValueError(f"longer than {TEXT_CHARS} characters")
    return text


def _date(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return str_to_date(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{raw[:40]!r} is not a date as rq writes it") from e


def _flag(raw: bytes) -> bool:
    if raw not in (b"0", b"1"):
        raise ValueError(f"{raw[:40]!r} is not 0 or 1")
    return raw == b"1"


def _status(raw: bytes) -> JobStatus:
    return JobStatus(raw.decode("ascii"))


def _queue(raw: bytes) -> str:
    text = raw.decode("ascii")
    if not _QUEUE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a queue name")
    return text


def _empty(raw: bytes) -> None:
    if raw:
        raise ValueError("must be empty")


def _int_list(raw: bytes) -> list[int]:
    value = jsonsafe.loads(raw, max_depth=1)
    if not isinstance(value, list) or len(value) > 100 or any(type(v) is not int or v < 0 for v in value):
        raise ValueError("is not a short list of non-negative integers")
    return value


def _exc(raw: bytes) -> None:
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, EXC_INFLATED + 1)
    except zlib.error:
        return  # not compressed: rq keeps it as text
    if len(out) > EXC_INFLATED or d.unconsumed_tail:  # rq would inflate it whole
        raise ValueError(f"inflates past {EXC_INFLATED:,} bytes")


def _any(raw: bytes) -> None:
    """Kept as rq wrote it: rq reads it inside its own try/except (a job returning Retry leaves
    "Unserializable return value" here); its size is bounded like every field's."""


FIELDS: dict[str, Callable[[bytes], Any]] = {
    "created_at": _date,
    "enqueued_at": _date,
    "started_at": _date,
    "ended_at": _date,
    "last_heartbeat": _date,
    "origin": _queue,
    "description": _text,
    "worker_name": _text,
    "group_id": _empty,
    "status": _status,
    "timeout": _int(1, 10**8),
    "result_ttl": _int(-1, 10**10),
    "failure_ttl": _int(-1, 10**10),
    "ttl": _int(1, 10**10),
    "retries_left": _int(0, 10**6),
    "number_of_retries": _int(0, 10**6),
    "retry_intervals": _int_list,
    "enqueue_at_front_on_retry": _flag,
    "enqueue_at_front": _flag,
    "exc_info": _exc,
    "result": _any,
    **{name: _empty for name in CALLBACKS},
}


def check_data(job_id: str, raw: bytes) -> tuple[str, dict[str, Any]]:
    """(function name, payload) from rq's data field: [func, instance, args, kwargs] in JSON."""
    if len(raw) > DATA_COMPRESSED:
        raise SecurityError(
            f"job {job_id}: its data is {len(raw):,} bytes compressed, over {DATA_COMPRESSED:,} (a kd-client job "
            "names its training data by sha256); refused before inflating it"
        )
    try:
        text = inflate(raw, DATA_INFLATED)
    except ValueError as e:
        raise SecurityError(f"job {job_id}: its data {e}; refused (a kd-client job is a few KB of JSON)") from e
    try:
        value = jsonsafe.loads(text)
    except jsonsafe.TooDeep as e:
        raise SecurityError(f"job {job_id}: its data is {e}; refused") from e
    except ValueError as e:
        raise SecurityError(
            f"job {job_id}: its data is not JSON (rq's default pickle serializer?); this worker reads JSON only "
            "and never unpickles; enqueue with serializer=JSONSerializer"
        ) from e
    if not isinstance(value, list) or len(value) != 4:
        raise SecurityError(f"job {job_id}: its data is not rq's [function, instance, args, kwargs]")
    func, instance, args, kwargs = value
    if func not in ALLOWED_TASKS or instance is not None:
        raise SecurityError(f"task {func!r} is not allowed on this worker; allowed: {sorted(ALLOWED_TASKS)}")
    if args or not isinstance(kwargs, dict) or set(kwargs) != {"payload"}:
        n_args = len(args) if isinstance(args, list) else repr(args)
        names = sorted(kwargs) if isinstance(kwargs, dict) else repr(kwargs)
        raise ConfigError(
            f"job arguments must be kwargs={{'payload': {{...}}}}; got args={n_args} kwargs={names}; "
            "submit through kd-client/KDClient"
        )
    return func, kwargs["payload"]


def check_meta(job_id: str, raw: bytes | None, payload: Any) -> None:
    if raw is None:
        raise ConfigError(f"job {job_id} has no meta (ticket, domain, submitter); submit through kd-client/KDClient")
    if len(raw) > META_BYTES:
        raise ConfigError(f"job {job_id}: its meta is {len(raw):,} bytes, over {META_BYTES:,}")
    try:
        meta = parse_meta(jsonsafe.loads(raw))
    except ValueError as e:
        raise ConfigError(f"job {job_id}: its meta is not JSON ({e})") from e
    domain = payload.get("domain") if isinstance(payload, dict) else None
    if meta.domain != domain:
        raise ConfigError(f"job meta names domain {meta.domain!r} but its payload {domain!r}; submit through kd-client")


def check_hash(job_id: str, fields: dict[str, bytes]) -> None:
    """Refuse (JobRefused) a job hash that kd-client could not have written."""
    try:
        side = sorted(f for f in fields if f in SIDE_CHANNELS or (f in CALLBACKS and fields[f]))
        unknown = sorted(f for f in fields if f not in FIELDS and f not in SIDE_CHANNELS and f not in ("data", "meta"))
        if side or unknown:
            raise SecurityError(
                f"job {job_id} carries rq fields a kd-client job never has: {side + unknown} (callbacks, webhooks, "
                "dependencies, repeats and rate limits are not run on this worker); submit through kd-client"
            )
        for name, check in FIELDS.items():
            if name in fields:
                try:
                    check(fields[name])
                except (ValueError, UnicodeDecodeError) as e:
                    raise ConfigError(f"job {job_id}: rq field {name} {e}; submit through kd-client") from e
        if "data" not in fields:
            raise ConfigError(f"job {job_id} has no data")
        _, payload = check_data(job_id, fields["data"])
        check_meta(job_id, fields.get("meta"), payload)
    except KDError as e:
        raise JobRefused(job_id, e, fields) from e


def _refused(job_id: str, error: KDError, fields: dict[str, bytes] | None) -> JobRefused:
    """JobRefused for an error found without an exception (raised here: its traceback is the record)."""
    try:
        raise error
    except KDError as e:
        return JobRefused(job_id, e, fields)


def read_hash(conn: Redis, key: str, job_id: str) -> dict[str, bytes]:
    """The job hash, refused unread if it is not a hash or holds oversized fields ({} if absent)."""
    try:
        reply = conn.eval(_BOUNDED_HGETALL, 1, key, MAX_FIELDS, MAX_FIELD_BYTES)
    except ResponseError as e:
        if "WRONGTYPE" not in str(e):
            raise
        kind = conn.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        error: KDError = StateError(f"Redis key {key} holds a {kind}, not a job hash; kd-daemon did not write it")
        raise _refused(job_id, error, None) from e
    if reply[0] == 0:
        field = reply[1].decode(errors="replace") if isinstance(reply[1], bytes) else reply[1]
        what = f"it has {reply[2]} fields" if field == "fields" else f"its field {field} is {reply[2]:,} bytes"
        error = SecurityError(f"job {job_id}: {what}, more than a kd-client job ever has; refused unread")
        raise _refused(job_id, error, {})
    flat = reply[1:]
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


REFUSED_DATA = b"[null, null, [], {}]"  # kept instead of data that could not be trusted


def salvage(fields: dict[str, bytes]) -> dict[str, Any]:
    """The fields of a refused hash that are well-formed on their own, as values."""
    kept: dict[str, Any] = {}
    for name in ("created_at", "enqueued_at", "origin", "description", "timeout", "result_ttl", "failure_ttl"):
        if name in fields:
            try:
                kept[name] = FIELDS[name](fields[name])
            except (ValueError, UnicodeDecodeError):
                pass
    try:
        meta = jsonsafe.loads(fields["meta"]) if len(fields.get("meta", b"")) <= META_BYTES else None
        if isinstance(meta, dict):
            kept["meta"] = meta
    except (KeyError, ValueError):
        pass
    try:
        check_data("", fields["data"])
        kept["data"] = inflate(fields["data"], DATA_INFLATED)
    except (KeyError, KDError, ValueError):
        pass
    return kept


def record_refusal(conn: Redis, refused: JobRefused, origin: str, worker_name: str) -> None:
    """The refused job as a failed job that kd-client can read: its well-formed fields kept, the
    rest dropped, the error recorded as its failure (no callback, no webhook, no dependents)."""
    kept = salvage(refused.fields or {})
    job = Job(refused.job_id, connection=conn, serializer=JSONSerializer)
    job.data = kept.get("data", REFUSED_DATA)
    job.origin = kept.get("origin") or origin
    job.description = kept.get("description")
    job.created_at = kept.get("created_at") or now()
    job.enqueued_at = kept.get("enqueued_at")
    job.meta = kept.get("meta", {})
    job.timeout, job.result_ttl, job.failure_ttl = (kept.get(k) for k in ("timeout", "result_ttl", "failure_ttl"))
    job.ended_at = now()
    exc_string = "".join(traceback.format_exception(refused.error))
    with conn.pipeline() as pipe:
        pipe.delete(job.key)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job.save(pipeline=pipe)
        job.failed_job_registry.add(job, ttl=job.failure_ttl, exc_string=exc_string, pipeline=pipe)
        Result.create_failure(job, job.failure_ttl, exc_string=exc_string, worker_name=worker_name, pipeline=pipe)
        pipe.execute()


class ContractJob(Job):
    """rq's Job, read only through the contract: a hash kd-client could not have written raises
    JobRefused before rq looks at it, and a callback name is never resolved."""

    def refresh(self) -> None:
        fields = read_hash(self.connection, self.key, self.id)
        if not fields:
            raise NoSuchJobError(f"No such job: {self.key}")
        self.restore(fields)

    def restore(self, raw_data: Any) -> Any:
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in dict(raw_data).items()}
        fields = {k: v.encode() if isinstance(v, str) else v for k, v in fields.items()}
        check_hash(self.id, fields)
        return super().restore(raw_data)

    # never resolved, whatever a hash said (the contract refuses non-empty names anyway)
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None
