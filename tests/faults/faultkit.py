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
from pathlib import Path
from typing import Any

import redis
from helpers import connect, row
from rq import Queue
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
    """Enqueue without any client-side check (what anyone able to write to Redis can do)."""
    q = Queue(queue, connection=conn, serializer=JSONSerializer)
    return q.enqueue(func, args=args, kwargs=kwargs or {}, job_id=job_id, meta=meta or {}, **kw).id


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
