"""The corpus under faults: kill -9 of a real `kd-worker run` mid-training loses nothing from the
corpus and its restart records nothing twice; a kill -9 of Redis (shipped redis.conf: AOF
everysec) right after a recording keeps it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import redis
from faultkit import submit
from helpers import connect, wait_for, wait_phase, wait_status

from jobs.models import corpus_key, health_key
from jobs.records import example_key
from kd_client.corpus import Corpus, CorpusLimits, NewExample

LIMITS = CorpusLimits(10_000, 10**8, 64)


def corrections(path: Path, n: int) -> tuple[Path, set[str]]:
    rows = [
        {"prompt": f"Where does person {i} live?", "response": f"Person {i} lives in town {i * 3}."} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {example_key(({"role": "user", "content": r["prompt"]},), r["response"]) for r in rows}
    return path, keys


def corpus_dump(conn: redis.Redis) -> dict[bytes, object]:
    """The content of every corpus key (not DUMP: a reloaded hash may be encoded differently)."""
    read = {b"hash": conn.hgetall, b"zset": lambda k: conn.zrange(k, 0, -1, withscores=True), b"set": conn.smembers}
    return {k: read[conn.type(k)](k) for k in sorted(conn.keys("kd:corpus:*") + conn.keys("kd:regression:*"))}


def test_a_kill_mid_job_loses_nothing_from_the_corpus(env, worker, tmp_path):
    conn, name = connect(env), "kd-continual-kill"
    data, keys = corrections(tmp_path / "facts.jsonl", 24)
    w = worker(name=name)
    job = submit(env, "memory", corrections=[data], overrides={"iterations": 60, "save_every": 5, "val_every": 100000})
    wait_phase(conn, job, "train", min_step=2)
    corpus = Corpus(conn, "memory", LIMITS)
    recorded = corpus_dump(conn)
    assert {r.key for r in corpus.records()} == keys  # recorded whole before training started
    w.signal(signal.SIGKILL)
    w.wait(30)
    assert corpus_dump(conn) == recorded  # the kill took nothing away
    wait_for(lambda: not conn.exists(health_key(name)), 10, what="the killed worker's health key to lapse")
    w = worker(name=name)  # recovers the orphaned job, which resumes from its checkpoint
    assert wait_status(conn, job, {"finished"}, timeout=240)["outcome"]["published"]
    recs = corpus.records()
    assert {r.key for r in recs} == keys and sorted(r.seq for r in recs) == list(range(1, 25))  # no duplicate
    assert all(r.recorded == 1 and [p.job_id for p in r.provenance] == [job] for r in recs)
    assert w.events("corpus_recorded")[-1] | {"added": 0, "known": 24} == w.events("corpus_recorded")[-1]
    held_out = [r.key for r in recs if r.held_out]
    assert len(held_out) == 2 and sorted(corpus.regression_keys()) == sorted(held_out)  # 10% of 24, joined at the end


def test_a_recorded_batch_survives_a_redis_kill_with_the_shipped_config(shipped_redis):
    conn = shipped_redis.client()
    c = Corpus(conn, "memory", LIMITS)
    batch = [
        NewExample(
            example_key(({"role": "user", "content": f"q{i}"},), f"a{i}"),
            ({"role": "user", "content": f"q{i}"},),
            f"a{i}",
            "train",
        )
        for i in range(50)
    ]
    c.record(batch, "job-a", "ego")
    before = corpus_dump(conn)
    shipped_redis.stop(signal.SIGKILL)  # right after the reply: only the AOF file has it
    shipped_redis.start()
    assert corpus_dump(conn) == before and conn.hlen(corpus_key("memory")) == 50
