"""The per-domain corpus on a real redis-server (kd_client.corpus): it records and de-duplicates,
keeps provenance, writes a batch all or nothing, refuses to overflow its limits, keeps counters
exact under concurrent writers (WATCH/MULTI), reservoir-samples the regression set, and forgets."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
import redis

from jobs.errors import CorpusFull, DataError, KDError
from jobs.models import corpus_held_out_key, corpus_key, corpus_meta_key, corpus_order_key, regression_key
from jobs.records import example_key
from kd_client.corpus import Corpus, CorpusLimits, NewExample

BIG = CorpusLimits(max_examples=10_000, max_bytes=10**8, regression_max=8)


def ex(i: int, role: str = "train", tag: str = "fact") -> NewExample:
    prompt = ({"role": "user", "content": f"What is {tag} {i}?"},)
    response = f"{tag} {i} is {i * 7 % 13}."
    return NewExample(example_key(prompt, response), prompt, response, role)  # type: ignore[arg-type]


@pytest.fixture
def conn(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def stored_bytes(conn: redis.Redis, domain: str) -> int:
    return sum(conn.hstrlen(corpus_key(domain), k) for k in conn.hkeys(corpus_key(domain)))


def test_records_once_with_provenance_and_a_retry_changes_nothing(conn):
    c = Corpus(conn, "memory", BIG)
    batch = [ex(0), ex(1), ex(1), ex(2, "held_out")]  # ex(1) twice in one job: recorded once
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    done = c.record(batch, "job-a", "ego", at)
    assert (done.added, done.known, done.examples) == (3, 0, 3)
    assert done.bytes == stored_bytes(conn, "memory") == int(conn.hget(corpus_meta_key("memory"), "bytes"))
    before = conn.hgetall(corpus_key("memory"))
    assert c.record(batch, "job-a", "ego").added == 0  # the same job again (a retry): nothing changes
    assert conn.hgetall(corpus_key("memory")) == before
    again = c.record([ex(1), ex(3)], "job-b", "kd-client")
    assert (again.added, again.known, again.examples) == (1, 1, 4)
    recs = {r.key: r for r in c.records()}
    assert [r.seq for r in c.records()] == [1, 2, 3, 4]
    assert [p.job_id for p in recs[ex(1).key].provenance] == ["job-a", "job-b"]
    assert recs[ex(1).key].provenance[0].at == at and recs[ex(1).key].provenance[0].submitter == "ego"
    assert recs[ex(0).key].recorded == 1 and recs[ex(1).key].recorded == 2
    assert {k.decode() for k in conn.smembers(corpus_held_out_key("memory"))} == {ex(2).key}
    assert c.history() == [(ex(0).key, 1), (ex(1).key, 2), (ex(3).key, 4)]  # held-out ones are never replayed
    assert c.history(exclude={ex(3).key}) == [(ex(0).key, 1), (ex(1).key, 2)]
    assert Corpus(conn, "debug", BIG).records() == []  # domains are separate


def test_a_batch_is_recorded_whole_or_not_at_all(conn):
    c = Corpus(conn, "memory", BIG)
    c.record([ex(9)], "job-a", "ego")
    conn.hset(corpus_key("memory"), ex(9).key, b'{"schema_version": 1, "key": "garbage"}')  # a damaged record
    snapshot = {k: conn.dump(k) for k in conn.keys("kd:*")}
    with pytest.raises(DataError, match="forget"):
        c.record([ex(0), ex(1), ex(9)], "job-b", "ego")  # the damaged one comes last
    assert {k: conn.dump(k) for k in conn.keys("kd:*")} == snapshot  # ex(0), ex(1) were not written either


def test_a_job_that_would_overflow_the_corpus_fails_and_writes_nothing(conn):
    c = Corpus(conn, "memory", CorpusLimits(max_examples=5, max_bytes=10**8, regression_max=8))
    c.record([ex(i) for i in range(4)], "job-a", "ego")
    with pytest.raises(CorpusFull, match="KD_CORPUS_MAX_EXAMPLES=5.*forget ID"):
        c.record([ex(i) for i in range(3, 6)], "job-b", "ego")
    assert len(c.records()) == 4 and all(r.recorded == 1 for r in c.records())
    assert c.record([ex(4)], "job-c", "ego").examples == 5  # exactly at the limit is fine
    size = int(conn.hget(corpus_meta_key("memory"), "bytes"))
    tight = Corpus(conn, "memory", CorpusLimits(max_examples=100, max_bytes=size + 10, regression_max=8))
    with pytest.raises(CorpusFull, match="KD_CORPUS_MAX_BYTES"):
        tight.record([ex(7)], "job-d", "ego")
    assert tight.record([ex(0)], "job-d", "ego").added == 0  # known examples only gain provenance


def test_concurrent_writers_of_one_domain_lose_nothing(redis_url):
    """Two workers recording the same domain at once: WATCH/MULTI retries, counters stay exact."""
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        c = Corpus(redis.Redis.from_url(redis_url), "memory", BIG)
        try:
            for j in range(15):
                c.record([ex(i, tag=tag) for i in range(j * 4, j * 4 + 4)] + [ex(j, tag="shared")], f"{tag}-{j}", tag)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    conn = redis.Redis.from_url(redis_url)
    recs = Corpus(conn, "memory", BIG).records()
    assert len(recs) == 2 * 60 + 15
    assert sorted(r.seq for r in recs) == list(range(1, len(recs) + 1))  # no sequence number given twice
    assert int(conn.hget(corpus_meta_key("memory"), "bytes")) == stored_bytes(conn, "memory")
    assert all(r.recorded == 2 for r in recs if "shared" in r.prompt[0].content)


def test_the_regression_set_is_a_deterministic_capped_reservoir(conn, redis_url):
    c = Corpus(conn, "memory", BIG)  # 8 slots
    c.record([ex(i, "held_out") for i in range(30)], "job-a", "ego")
    joined = c.offer_regression([ex(i).key for i in range(5)])
    assert joined == [ex(i).key for i in range(5)]  # room for all
    assert c.offer_regression([ex(i).key for i in range(5)]) == []  # each example is offered once
    c.offer_regression([ex(i).key for i in range(5, 30)])
    keys = c.regression_keys()
    assert len(keys) == 8 and len(set(keys)) == 8
    assert int(conn.hget(corpus_meta_key("memory"), "offered")) == 30
    assert int(conn.hget(corpus_meta_key("memory"), "bytes")) == stored_bytes(conn, "memory")
    # the same history in another Redis database draws the same reservoir
    other = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/1")
    other.flushdb()
    d = Corpus(other, "memory", BIG)
    d.record([ex(i, "held_out") for i in range(30)], "job-a", "ego")
    d.offer_regression([ex(i).key for i in range(5)])
    d.offer_regression([ex(i).key for i in range(5, 30)])
    assert d.regression_keys() == keys
    other.flushdb()


def test_forget_removes_an_example_everywhere(conn):
    c = Corpus(conn, "memory", BIG)
    c.record([ex(0), ex(1), ex(2, "held_out"), ex(3, "held_out")], "job-a", "ego")
    c.offer_regression([ex(2).key, ex(3).key])
    assert c.resolve([ex(1).key[:10], ex(2).key]) == [ex(1).key, ex(2).key]
    assert c.forget([ex(1).key, ex(2).key, "f" * 64]) == [ex(1).key, ex(2).key]
    assert [r.key for r in c.records()] == [ex(0).key, ex(3).key]
    assert c.regression_keys() == [ex(3).key]
    assert conn.zscore(corpus_order_key("memory"), ex(1).key) is None
    assert not conn.sismember(corpus_held_out_key("memory"), ex(2).key)
    assert ex(2).key.encode() not in conn.hvals(regression_key("memory"))
    assert int(conn.hget(corpus_meta_key("memory"), "bytes")) == stored_bytes(conn, "memory")
    assert c.history() == [(ex(0).key, 1)]
    c.offer_regression([ex(2).key])  # a forgotten example never comes back through the reservoir
    assert c.regression_keys() == [ex(3).key]
    with pytest.raises(KDError, match="no such example"):
        c.resolve([ex(1).key])
    with pytest.raises(KDError, match="no such example"):
        c.resolve(["abc"])  # too short to be an id prefix
