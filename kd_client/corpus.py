"""A domain's corpus and regression set in Redis: the one module the worker (recording a job's
examples, choosing replay, the gate's regression set) and `kd-client data` (list, stats, export,
forget, rebuild) share. The record itself is `jobs.corpus.CorpusRecord`.

Why Redis: several workers on several machines serve one queue and share one Redis, not a disk;
the domain's publish order already lives there. Layout (names in `jobs.models`):

    kd:corpus:{domain}            hash   example key -> CorpusRecord JSON (each example once)
    kd:corpus:{domain}:order      zset   example key -> sequence number (oldest first)
    kd:corpus:{domain}:held_out   set    keys some job held out (never replayed)
    kd:corpus:{domain}:meta       hash   seq, bytes (stored record bytes), offered (regression stream)
    kd:regression:{domain}        hash   reservoir slot -> example key

Every change is one MULTI/EXEC under WATCH of these keys (redis-py's `transaction`): a process
killed mid-way leaves nothing or the whole change, and two writers of one domain retry rather
than overwrite each other. Durability is Redis's: with the shipped redis.conf (AOF, `appendfsync
everysec`) an acknowledged change is in the AOF file before the reply (Redis writes it first; only
a disk so slow that the previous fsync is still running can delay that by up to 2 s), so it
survives a kill of Redis; a power loss or kernel crash can lose about the last second. The worker
records a job's examples before training: a loss then hits only jobs started in that second, and
their retry records them again (recording is idempotent per job).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import redis
from pydantic import ValidationError

from jobs.corpus import CorpusRecord, Provenance, Role, new_record, parse_corpus_record, utc_now
from jobs.errors import CorpusFull, DataError, KDError
from jobs.models import corpus_held_out_key, corpus_key, corpus_meta_key, corpus_order_key, regression_key
from jobs.settings import QueueSettings

T = TypeVar("T")
MIN_PREFIX = 8  # shortest example-id prefix `forget` accepts


@dataclass(frozen=True)
class CorpusLimits:
    max_examples: int
    max_bytes: int
    regression_max: int

    @classmethod
    def from_settings(cls, s: QueueSettings) -> CorpusLimits:
        return cls(s.corpus_max_examples, s.corpus_max_bytes, s.regression_max_examples)


@dataclass(frozen=True)
class NewExample:
    """One example of a job, as the worker records it (key: `jobs.records.example_key`)."""

    key: str
    prompt: tuple[dict[str, str], ...]
    response: str | None
    role: Role


@dataclass(frozen=True)
class Recorded:
    added: int  # examples new to the corpus
    known: int  # examples it held already (provenance added, or this job's retry)
    examples: int  # the corpus's size afterwards
    bytes: int


def reservoir_slot(domain: str, seen: int, cap: int) -> int | None:
    """Algorithm R with a deterministic draw: the `seen`-th example offered (0-based) to a full
    reservoir of `cap` slots replaces slot j, j uniform in [0, seen] from a hash of (domain, seen);
    None (j >= cap): not kept. Every offered example ends up kept with probability cap / offered."""
    j = int.from_bytes(hashlib.sha256(f"{domain}:{seen}".encode()).digest()[:8], "big") % (seen + 1)
    return j if j < cap else None


class Corpus:
    """The corpus and regression set of one domain."""

    def __init__(self, conn: redis.Redis, domain: str, limits: CorpusLimits):
        self.conn, self.domain, self.limits = conn, domain, limits
        self.k_records, self.k_order = corpus_key(domain), corpus_order_key(domain)
        self.k_held, self.k_meta, self.k_regression = (
            corpus_held_out_key(domain),
            corpus_meta_key(domain),
            regression_key(domain),
        )

    def _transact(self, fn: Callable[[Any], T]) -> T:
        keys = (self.k_records, self.k_order, self.k_held, self.k_meta, self.k_regression)
        return cast(T, self.conn.transaction(cast(Any, fn), *keys, value_from_callable=True))

    def _parse(self, key: str, raw: bytes) -> CorpusRecord:
        try:
            return parse_corpus_record(raw)
        except ValidationError as e:
            raise DataError(
                f"corpus record {key[:12]} of {self.domain} is unreadable ({e.errors()[0]['msg']}); "
                f"remove it with `kd-client data --domain {self.domain} forget {key}`"
            ) from e

    # --- writing --------------------------------------------------------------------------------
    def record(
        self, examples: Sequence[NewExample], job_id: str, submitter: str, at: datetime | None = None
    ) -> Recorded:
        """Record a job's examples, all or none: new ones are added, known ones gain this job's
        provenance (a retry of the job changes nothing). Raises CorpusFull, writing nothing, when
        new examples would take the domain over its limits."""
        batch = list({ex.key: ex for ex in reversed(examples)}.values())[::-1]  # first occurrence wins
        when = at or utc_now()

        def txn(pipe) -> Recorded:
            olds = pipe.hmget(self.k_records, [ex.key for ex in batch]) if batch else []
            seq = int(pipe.hget(self.k_meta, "seq") or 0)
            size, count = int(pipe.hget(self.k_meta, "bytes") or 0), int(pipe.hlen(self.k_records))
            blobs, order, held, added = {}, {}, [], 0
            for ex, old in zip(batch, olds, strict=True):
                entry = Provenance(job_id=job_id, submitter=submitter, at=when, role=ex.role)
                if old is None:
                    seq, added = seq + 1, added + 1
                    rec = new_record(ex.key, seq, ex.prompt, ex.response, entry)
                    order[ex.key] = seq
                else:
                    prev = self._parse(ex.key, old)
                    if (rec := prev.with_provenance(entry)) is prev:
                        continue
                blob = rec.model_dump_json().encode()
                size += len(blob) - len(old or b"")
                blobs[ex.key] = blob
                if ex.role == "held_out":
                    held.append(ex.key)
            if added:
                self._check_limits(count + added, size, added)
            pipe.multi()
            if blobs:
                pipe.hset(self.k_records, mapping=blobs)
            if order:
                pipe.zadd(self.k_order, order)
            if held:
                pipe.sadd(self.k_held, *held)
            pipe.hset(self.k_meta, mapping={"seq": seq, "bytes": size})
            return Recorded(added, len(batch) - added, count + added, size)

        return self._transact(txn)

    def _check_limits(self, examples: int, size: int, added: int) -> None:
        lim, d = self.limits, self.domain
        for what, value, limit, var in (
            ("examples", examples, lim.max_examples, "KD_CORPUS_MAX_EXAMPLES"),
            ("bytes", size, lim.max_bytes, "KD_CORPUS_MAX_BYTES"),
        ):
            if value > limit:
                raise CorpusFull(
                    f"recording this job's {added} new examples would take the {d} corpus to {value:,} {what}, "
                    f"over {var}={limit:,}; nothing was recorded or trained. Make room with "
                    f"`kd-client data --domain {d} forget ID...` (ids: `kd-client data --domain {d} list`) "
                    f"or raise {var}"
                )

    def offer_regression(self, keys: Iterable[str]) -> list[str]:
        """Offer a concluded job's held-out examples to the regression reservoir (each example once
        in the domain's life; forgotten ones are skipped); returns the keys that joined."""
        wanted = list(dict.fromkeys(keys))
        cap = self.limits.regression_max

        def txn(pipe) -> list[str]:
            olds = pipe.hmget(self.k_records, wanted) if wanted else []
            slots = {int(s): k.decode() for s, k in pipe.hgetall(self.k_regression).items()}
            seen = int(pipe.hget(self.k_meta, "offered") or 0)
            size = int(pipe.hget(self.k_meta, "bytes") or 0)
            blobs, joined, dropped = {}, [], [s for s in slots if s >= cap]
            for s in dropped:
                del slots[s]
            for key, old in zip(wanted, olds, strict=True):
                if old is None or (rec := self._parse(key, old)).offered:
                    continue
                free = [s for s in range(cap) if s not in slots]
                slot = free[0] if free else reservoir_slot(self.domain, seen, cap)
                seen += 1
                if slot is not None:
                    slots[slot] = key
                    joined.append(key)
                blob = rec.model_copy(update={"offered": True}).model_dump_json().encode()
                size += len(blob) - len(old)
                blobs[key] = blob
            pipe.multi()
            if dropped:
                pipe.hdel(self.k_regression, *dropped)
            if slots:
                pipe.hset(self.k_regression, mapping=slots)
            if blobs:
                pipe.hset(self.k_records, mapping=blobs)
            pipe.hset(self.k_meta, mapping={"offered": seen, "bytes": size})
            return joined

        return self._transact(txn)

    def forget(self, keys: Collection[str]) -> list[str]:
        """Remove examples from the corpus and the regression set; returns the keys removed."""
        wanted = list(dict.fromkeys(keys))

        def txn(pipe) -> list[str]:
            olds = pipe.hmget(self.k_records, wanted) if wanted else []
            slots = {s.decode(): k.decode() for s, k in pipe.hgetall(self.k_regression).items()}
            gone = [k for k, old in zip(wanted, olds, strict=True) if old is not None]
            freed = sum(len(old) for old in olds if old is not None)
            pipe.multi()
            if gone:
                pipe.hdel(self.k_records, *gone)
                pipe.zrem(self.k_order, *gone)
                pipe.srem(self.k_held, *gone)
                pipe.hincrby(self.k_meta, "bytes", -freed)
            if stale := [s for s, k in slots.items() if k in wanted]:
                pipe.hdel(self.k_regression, *stale)
            return gone

        return self._transact(txn)

    # --- reading --------------------------------------------------------------------------------
    def get(self, keys: Sequence[str]) -> list[CorpusRecord]:
        """The records of `keys` that still exist, in the order asked."""
        raws: list[bytes | None] = cast(Any, self.conn.hmget(self.k_records, list(keys))) if keys else []
        return [self._parse(k, raw) for k, raw in zip(keys, raws, strict=True) if raw is not None]

    def records(self) -> list[CorpusRecord]:
        """Every record, oldest first."""
        stored: dict[bytes, bytes] = cast(Any, self.conn.hgetall(self.k_records))
        recs = [self._parse(k.decode(), raw) for k, raw in stored.items()]
        return sorted(recs, key=lambda r: r.seq)

    def history(self, exclude: Collection[str] = ()) -> list[tuple[str, int]]:
        """(key, seq) of the examples a job may replay, oldest first: the corpus minus what any job
        held out, minus the regression set, minus `exclude` (the job's own examples). One snapshot."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.zrange(self.k_order, 0, -1, withscores=True)
            pipe.smembers(self.k_held)
            pipe.hvals(self.k_regression)
            order, held, regression = pipe.execute()
        skip = {k.decode() for k in held} | {k.decode() for k in regression} | set(exclude)
        return [(k.decode(), int(s)) for k, s in order if k.decode() not in skip]

    def training_members(self) -> list[CorpusRecord]:
        """What `kd-client data rebuild` retrains on: every replayable example, oldest first."""
        return self.get([k for k, _ in self.history()])

    def regression_keys(self) -> list[str]:
        slots: dict[bytes, bytes] = cast(Any, self.conn.hgetall(self.k_regression))
        return [k.decode() for _, k in sorted(slots.items(), key=lambda kv: int(kv[0]))]

    def resolve(self, ids: Sequence[str]) -> list[str]:
        """Full example keys from ids or unique prefixes (at least 8 hex digits); any id that
        matches nothing or several examples is a KDError, and nothing is resolved."""
        keys = [k.decode() for k in cast(list[bytes], self.conn.zrange(self.k_order, 0, -1))]
        out, problems = [], []
        for i in ids:
            i = i.strip().lower()
            hits = [k for k in keys if k.startswith(i)] if len(i) >= MIN_PREFIX else []
            if len(hits) == 1:
                out.append(hits[0])
            else:
                problems.append(f"{i!r} ({'ambiguous' if hits else 'no such example'})")
        if problems:
            raise KDError(
                f"{self.domain} corpus: {', '.join(problems)}; give example ids (or prefixes of at least "
                f"{MIN_PREFIX} characters) as `kd-client data --domain {self.domain} list` prints them"
            )
        return out

    def stats(self) -> dict[str, Any]:
        recs = self.records()
        meta: dict[bytes, bytes] = cast(Any, self.conn.hgetall(self.k_meta))
        regression = self.regression_keys()
        history = self.history()
        firsts = [r.provenance[0].at for r in recs]
        return {
            "domain": self.domain,
            "examples": len(recs),
            "bytes": int(meta.get(b"bytes", 0)),
            "corrections": sum(r.response is not None for r in recs),
            "prompts": sum(r.response is None for r in recs),
            "replayable": len(history),
            "held_out": sum(r.held_out for r in recs),
            "regression": len(regression),
            "offered_to_regression": int(meta.get(b"offered", 0)),
            "jobs": len({p.job_id for r in recs for p in r.provenance}),
            "oldest": min(firsts).isoformat(timespec="seconds") if firsts else None,
            "newest": max(firsts).isoformat(timespec="seconds") if firsts else None,
            "limits": {
                "max_examples": self.limits.max_examples,
                "max_bytes": self.limits.max_bytes,
                "regression_max": self.limits.regression_max,
            },
        }
