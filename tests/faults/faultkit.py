"""Shared pieces of the fault-injection suite.

- job data whose phases (generate, score, train, validate, publish) last long enough to be hit
  by a signal sent when the job's own progress in job.meta says it is in that phase;
- the phase a job reports, read straight from Redis (tests/helpers.py: `row`, `wait_status`,
  `wait_phase`);
- raw enqueues that bypass the client's validation: a buggy or hostile producer;
- the invariants of adapters_kd/ that every fault must leave intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from helpers import SAMPLES, connect, row, wait_status
from rq import Queue, Retry
from rq.serializers import JSONSerializer

from jobs import publisher
from jobs.models import TASK_FUNC, blob_key
from kd_client import queue as Q
from kd_client.settings import ClientSettings

# A job whose phases each last about a second or more on the tiny models (2 shared cores):
# 24 prompts x 48 generated tokens in batches of 4, 60 corrections of ~100 tokens (scoring and
# a 42-sequence held-out set evaluated one sequence at a time), a checkpoint every step and a
# rank-64 adapter, so the version staged at publish holds 61 adapter files (~60 MB).
PHASED = {
    "iterations": 60,
    "save_every": 1,
    "val_every": 100000,
    "val_fraction": 0.5,
    "gen_max_tokens": 48,
    "gen_batch_size": 4,
    "batch_size": 1,
    "lora_rank": 64,
    "replay": 0.0,  # the phases' teacher work is exactly this job's (no replayed history)
}
# A quick job with the same adapter shape (same student, LoRA rank/layers): publishes a first
# version, so later jobs of the domain run the publish gate's validation against it.
# No held-out split: no regression set for the phased job's gate to generate responses for.
WARMUP = {
    "iterations": 4,
    "save_every": 4,
    "val_every": 100000,
    "gen_max_tokens": 8,
    "lora_rank": 64,
    "val_fraction": 0.0,
}


def write_prompts(path: Path, n: int, tag: str = "q") -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"{tag} {i}: tell me about item {i * 7} and why"}) + "\n" for i in range(n))
    )
    return path


def write_corrections(path: Path, n: int, words: int = 60, tag: str = "fact") -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{tag} {i}", "response": " ".join(f"w{(i * j) % 97}" for j in range(words))}) + "\n"
            for i in range(n)
        )
    )
    return path


def phased_data(tmp: Path) -> dict[str, list[Path]]:
    return {
        "prompts": [write_prompts(tmp / "phased-prompts.jsonl", 24)],
        "corrections": [write_corrections(tmp / "phased-corrections.jsonl", 60)],
    }


# --- Redis side ---------------------------------------------------------------------------------
def client_settings(env: dict[str, str], **over: Any) -> ClientSettings:
    return ClientSettings(
        redis_url=env["KD_REDIS_URL"],
        spool_dir=Path(env["KD_SPOOL_DIR"]),
        adapters_dir=Path(env["KD_ADAPTERS_DIR"]),
        **over,
    )


def submit(
    env: dict[str, str],
    domain: str,
    prompts=(),
    corrections=(),
    overrides: dict | None = None,
    priority: str = "normal",
    force_publish: bool = False,
    **settings: Any,
) -> str:
    """Submit as kd-client does (validated, deduplicated, ticketed); `settings` are ClientSettings
    fields, e.g. job_timeout or max_attempts."""
    s = client_settings(env, **settings)
    datasets = [
        Q.prepare_dataset(kind, Path(p).read_bytes(), Path(p).name, s.max_data_bytes)
        for kind, paths in (("prompts", prompts), ("corrections", corrections))
        for p in paths
    ]
    job = Q.build_job(domain, datasets, overrides or {}, priority=priority, force_publish=force_publish)
    return Q.submit(connect(env), s, job, datasets).job_id


def store_blob(conn: redis.Redis, data: bytes) -> dict[str, Any]:
    sha = hashlib.sha256(data).hexdigest()
    conn.set(blob_key(sha), data)
    return {"sha256": sha, "size": len(data)}


def raw_enqueue(
    conn: redis.Redis,
    kwargs: Any = None,
    func: str = TASK_FUNC,
    args: tuple = (),
    job_id: str | None = None,
    meta: dict | None = None,
    queue: str = "kd",
    **kw: Any,
) -> str:
    """Enqueue without any client-side check of the payload (what anyone able to write to Redis can
    do), with the meta a client writes (ticket from the domain's counter, active entry); `meta`
    entries replace those."""
    payload = (kwargs or {}).get("payload") if isinstance(kwargs, dict) else None
    domain = payload.get("domain") if isinstance(payload, dict) else None
    domain = domain if isinstance(domain, str) else "memory"
    ticket = int(conn.incr(f"kd:seq:{domain}"))
    q = Queue(queue, connection=conn, serializer=JSONSerializer)
    client_meta = {"ticket": ticket, "domain": domain, "submitter": "raw"}
    job = q.enqueue(func, args=args, kwargs=kwargs or {}, job_id=job_id, meta={**client_meta, **(meta or {})}, **kw)
    conn.zadd(f"kd:active:{domain}", {job.id: ticket})
    return job.id


def meta_phase(conn: redis.Redis, job_id: str) -> str | None:
    return ((row(conn, job_id) or {}).get("progress") or {}).get("phase")


# --- adapters_kd/ invariants --------------------------------------------------------------------
def current_version(adapters: Path, domain: str) -> int | None:
    v = publisher.resolve(adapters, domain)
    return None if v is None else v.number


def staging_dirs(adapters: Path, domain: str) -> list[Path]:
    d = adapters / domain
    return sorted(d.glob(".staging-*")) if d.is_dir() else []


def version_numbers(adapters: Path, domain: str) -> list[int]:
    return [v.number for v in publisher.versions(adapters, domain)]


def assert_consistent(adapters: Path, domain: str) -> dict[str, Any]:
    """What a reader can see is whole: every kept version matches its manifest, `current` points
    at one of them, the summary names the current version, no staging debris is left over."""
    kept = publisher.versions(adapters, domain)
    for v in kept:
        publisher.verify(v.path)  # raises PublishError on any partial or modified file
    current = publisher.resolve(adapters, domain)
    assert current is not None and current.number in [v.number for v in kept]
    entry = publisher.read_summary(adapters)["domains"][domain]
    assert entry["version"] == current.number, (entry["version"], current.number)
    assert entry["history"] == sorted(entry["history"]) and entry["history"][-1] == current.number
    assert not staging_dirs(adapters, domain)
    return entry


def world_writable(*roots: Path) -> list[str]:
    bad = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if not p.is_symlink() and p.stat().st_mode & 0o002:
                    bad.append(str(p))
    return bad


# --- hostile state: jobs shaped like the client's, then changed; what must stay untouched ----------
QUICK = {"iterations": 2, "save_every": 2, "val_every": 100000, "gen_max_tokens": 8}  # a job of a few seconds


def enqueue_like_client(
    env: dict[str, str],
    domain: str,
    data: bytes,
    *,
    job_id: str | None = None,
    meta: dict | None = None,
    payload: dict | None = None,
    raw: dict[str, Any] | None = None,
    ticket: int | None = None,
    also: Callable[[Any], None] | None = None,
    **rq_options: Any,
) -> str:
    """A job with exactly the fields kd_client.queue.submit writes (blob, ticket from the domain's
    counter, active entry, timeouts, retry, meta), then changed as anyone able to write to Redis
    can: rq options (callbacks, webhooks, dependencies), meta, payload fields, the ticket (meta and
    active entry), raw hash fields or other keys (`also(pipeline)`), all written in the same
    transaction as the enqueue (no worker can see the job in between)."""
    conn, s = connect(env), client_settings(env)
    blob = store_blob(conn, data)
    body = {
        "schema_version": 1,
        "domain": domain,
        "data": [{"kind": "prompts", "records": 1, "name": "hostile.jsonl", **blob}],
        "overrides": dict(QUICK),
        "submitter": "hostile",
        **(payload or {}),
    }
    issued = int(conn.incr(f"kd:seq:{domain}"))
    ticket = issued if ticket is None else ticket
    q = Queue(s.queue, connection=conn, serializer=JSONSerializer)
    job = q.create_job(
        TASK_FUNC,
        kwargs={"payload": body},
        job_id=job_id or f"hostile-{domain}-{issued}",
        timeout=s.job_timeout,
        result_ttl=s.result_ttl,
        failure_ttl=s.failure_ttl,
        retry=Retry(max=s.max_attempts - 1),
        meta={"ticket": ticket, "domain": domain, "submitter": "hostile"} if meta is None else meta,
        description=f"kd {domain}: hostile",
        **rq_options,
    )
    with conn.pipeline() as pipe:
        q.enqueue_job(job, pipeline=pipe)
        if raw:
            pipe.hset(job.key, mapping=raw)
        pipe.zadd(f"kd:active:{domain}", {job.id: ticket})
        if also is not None:
            also(pipe)
        pipe.execute()
    return job.id


def tree(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, tuple]:
    """Every entry under `root` (links recorded, never followed): type, size and sha256 of files."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if skip(p):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:  # a socket or fifo
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, tuple]:
    """Entries added, removed or changed between two `tree` snapshots: path -> (before, after)."""
    return {
        k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)
    }


class Unharmed:
    """The four checks after every hostile case: the worker is alive; the domain still takes jobs
    (a good job publishes, and the domain is consistent); nothing outside KD_ADAPTERS_DIR changed
    (the test's whole tmp dir but the worker's own dirs and logs); no other domain's files changed
    (and each other domain's summary entry still names its current version). Snapshots are taken
    when it is created, i.e. after the hostile state was planted."""

    def __init__(self, env: dict[str, str], worker: Any, domain: str):
        self.env, self.worker, self.domain = env, worker, domain
        self.adapters = Path(env["KD_ADAPTERS_DIR"])
        self.own = {self.adapters, Path(env["KD_WORK_DIR"]), Path(env["KD_SPOOL_DIR"])}
        self.outside, self.others = self._outside(), self._others()

    def _outside(self) -> dict[str, tuple]:
        return tree(self.adapters.parent, skip=lambda p: p in self.own or p.suffix == ".log" or p.name == "redis")

    def _others(self) -> dict[str, tuple]:
        def skip(p: Path) -> bool:  # the domain itself, and the shared summary + locks at the root
            return p.parent == self.adapters and (p.name == self.domain or not p.is_dir() or p.is_symlink())

        return tree(self.adapters, skip=skip)

    def check(self, repair: Callable[[], None] | None = None) -> dict[str, Any]:
        """`repair` removes planted state the daemon rightly refuses to touch (as its error says)."""
        assert self.worker.proc.poll() is None, "the worker died:\n" + self.worker.log_path.read_text()[-3000:]
        if repair is not None:
            repair()
        Unharmed._n += 1
        job = submit(
            self.env,
            self.domain,
            prompts=[SAMPLES / "memory.jsonl"],
            overrides={**QUICK, "learning_rate": 1e-4 * (1 + Unharmed._n / 1000)},  # a new job id each time
            force_publish=True,
        )
        st = wait_status(connect(self.env), job, {"finished", "failed", "stopped", "canceled"})
        assert st["status"] == "finished" and st["outcome"]["published"], st
        assert_consistent(self.adapters, self.domain)
        assert not (diff := changes(self.outside, self._outside())), f"changed outside KD_ADAPTERS_DIR: {diff}"
        assert not (diff := changes(self.others, self._others())), f"another domain's files changed: {diff}"
        summary = publisher.read_summary(self.adapters)["domains"]
        for d in {p.name for p in self.adapters.iterdir() if p.is_dir() and not p.is_symlink()} - {self.domain}:
            if (v := publisher.resolve(self.adapters, d)) is not None:
                assert summary[d]["version"] == v.number, (d, summary.get(d))
        assert self.worker.proc.poll() is None
        return st

    _n = 0
