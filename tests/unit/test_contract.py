"""The job contract (kd_worker/daemon/contract.py) against fakeredis: a job kd-client submits reads
through it unchanged; every field rq would act on that kd-client never writes is refused on the raw
hash, before rq reads it; a refusal is recorded as a failed job that rq and kd-client can read."""

from __future__ import annotations

import json
import tracemalloc
import zlib

import fakeredis
import pytest
from rq import Queue
from rq.callbacks import Callback
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import jsonsafe
from jobs.errors import ConfigError, SecurityError, StateError
from jobs.models import parse_job
from kd_client import queue as Q
from kd_client.settings import ClientSettings
from kd_worker.daemon.contract import (
    MAX_FIELD_BYTES,
    ContractJob,
    JobRefused,
    check_hash,
    inflate,
    record_refusal,
)


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


@pytest.fixture
def job_id(conn, tmp_path) -> str:
    """A job exactly as kd-client submits it."""
    s = ClientSettings(spool_dir=tmp_path / "spool")
    ds = [Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n', "p.jsonl", s.max_data_bytes)]
    return Q.submit(conn, s, Q.build_job("memory", ds, {}), ds).job_id


def fields(conn, job_id: str) -> dict[str, bytes]:
    return {k.decode(): v for k, v in conn.hgetall(f"rq:job:{job_id}").items()}


def refused(conn, job_id: str) -> JobRefused:
    with pytest.raises(JobRefused) as info:
        ContractJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
    return info.value


def test_a_client_job_reads_through_the_contract(conn, job_id):
    job = ContractJob.fetch(job_id, connection=conn, serializer=JSONSerializer)
    assert job.func_name == "kd_worker.daemon.task.run_kd_job" and job.meta["ticket"] == 1
    assert job.success_callback is None and job.failure_callback is None


@pytest.mark.parametrize(
    "field, value, error, says",
    [
        ("success_callback_name", b"builtins.print", SecurityError, "success_callback_name"),
        ("failure_callback_name", b"this.s", SecurityError, "failure_callback_name"),
        ("webhooks", b'[{"url": "http://x/", "job_status": "failed"}]', SecurityError, "webhooks"),
        ("dependency_ids", b'["other"]', SecurityError, "dependency_ids"),
        ("repeats_left", b"3", SecurityError, "repeats_left"),
        ("planted", b"1", SecurityError, "planted"),
        ("result_ttl", b"not-a-number", ConfigError, "result_ttl"),
        ("timeout", b"1h", ConfigError, "timeout"),
        ("status", b"bogus", ConfigError, "status"),
        ("created_at", b"yesterday", ConfigError, "created_at"),
        ("group_id", b"g", ConfigError, "group_id"),
        ("meta", b'{"ticket": 1, "domain": "memory", "submitter": "x", "run_as": "root"}', ConfigError, "run_as"),
        ("meta", b'{"ticket": "1", "domain": "memory", "submitter": "x"}', ConfigError, "ticket"),
        ("meta", b'{"ticket": 1, "domain": "debug", "submitter": "x"}', ConfigError, "domain"),
        ("data", zlib.compress(b'["os.system", null, ["id"], {}]'), SecurityError, "not allowed"),
        ("data", zlib.compress(b'["kd_worker.daemon.task.run_kd_job", null, [1], {}]'), ConfigError, "kwargs"),
        ("data", zlib.compress(b"\x80\x04pickle"), SecurityError, "never unpickles"),
        ("data", zlib.compress(b"[" * 5000 + b"]" * 5000), SecurityError, "nested"),
        ("data", zlib.compress(bytes(300_000)), SecurityError, "inflates past"),
        ("data", b"[1, 2]", SecurityError, "not zlib"),
    ],
)
def test_a_field_kd_client_never_writes_is_refused_on_the_raw_hash(conn, job_id, field, value, error, says):
    conn.hset(f"rq:job:{job_id}", field, value)
    e = refused(conn, job_id)
    assert isinstance(e.error, error) and says in str(e.error), e.error
    assert e.fields is not None and e.fields[field] == value


def test_oversized_fields_and_keys_of_another_type_are_refused_unread(conn, job_id):
    conn.hset(f"rq:job:{job_id}", "data", b"x" * (MAX_FIELD_BYTES + 1))
    e = refused(conn, job_id)
    assert isinstance(e.error, SecurityError) and "refused unread" in str(e.error) and e.fields == {}
    conn.delete(f"rq:job:{job_id}")
    conn.rpush(f"rq:job:{job_id}", "x")
    e = refused(conn, job_id)
    assert isinstance(e.error, StateError) and "holds a list" in str(e.error) and e.fields is None


def test_an_rq_callback_is_refused_as_enqueued_by_rq_itself(conn, job_id):
    q = Queue("kd", connection=conn, serializer=JSONSerializer)
    job = q.enqueue("kd_worker.daemon.task.run_kd_job", kwargs={"payload": {}}, on_success=Callback("this.s"))
    with pytest.raises(JobRefused, match="success_callback"):
        check_hash(job.id, fields(conn, job.id))


def test_data_is_inflated_with_a_bound():
    z = zlib.compressobj()
    bomb = b"".join(z.compress(bytes(1 << 20)) for _ in range(64)) + z.flush()
    tracemalloc.start()
    with pytest.raises(ValueError, match="inflates past 1,024 bytes"):
        inflate(bomb, 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # the 64 MB were never produced
    assert inflate(zlib.compress(b"x" * 1024), 1024) == b"x" * 1024
    with pytest.raises(ValueError, match="whole zlib stream"):
        inflate(zlib.compress(b"abc") + b"junk", 1024)


def test_a_refused_job_is_recorded_as_failed_and_readable(conn, job_id):
    conn.hset(f"rq:job:{job_id}", mapping={"result_ttl": b"not-a-number", "webhooks": b"[]"})
    e = refused(conn, job_id)
    record_refusal(conn, e, "kd", "w1")
    job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)  # plain rq reads it again
    assert job.get_status() == "failed" and job.meta["ticket"] == 1 and job.origin == "kd"
    assert job.func_name == "kd_worker.daemon.task.run_kd_job"  # the data was fine, so it is kept
    assert "SecurityError" in job.latest_result().exc_string and "webhooks" in job.latest_result().exc_string
    assert b"webhooks" not in conn.hkeys(f"rq:job:{job_id}") and job.result_ttl is None
    row = Q.describe(job)
    assert row["status"] == "failed" and row["error"].split(":")[0].endswith("SecurityError")


def test_json_nesting_is_limited_without_recursion():
    assert jsonsafe.depth({"a": [1, {"b": []}]}) == 4 and jsonsafe.depth(7) == 0
    for text in ("[" * 100_000 + "]" * 100_000, json.dumps(json.loads("[" * 40 + "]" * 40))):
        with pytest.raises(jsonsafe.TooDeep):
            jsonsafe.loads(text)
    assert jsonsafe.loads('{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.mark.parametrize(
    "field, value", [("schema_version", "1"), ("schema_version", 1.0), ("force_publish", "yes"), ("force_publish", 1)]
)
def test_payload_fields_are_not_coerced(field, value):
    payload = {"domain": "memory", "data": [{"kind": "prompts", "sha256": "a" * 64, "records": 1, "size": 3}]}
    assert parse_job(payload).force_publish is False
    with pytest.raises(ConfigError, match=field):
        parse_job({**payload, field: value})
    with pytest.raises(ConfigError, match="records"):
        parse_job({**payload, "data": [{**payload["data"][0], "records": "1"}]})
