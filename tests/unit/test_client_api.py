"""Producer side against fakeredis: submit, dedup, tickets, cancel; EGO's durable accumulation."""

from __future__ import annotations

import json

import fakeredis
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs.errors import ConfigError, DataError
from jobs.models import active_key, blob_key
from kd_client import queue as Q
from kd_client.api import KDClient
from kd_client.settings import ClientSettings


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


@pytest.fixture
def settings(tmp_path):
    return ClientSettings(spool_dir=tmp_path / "spool", accumulate_threshold=3, accumulate_max_age_s=3600)


def corr(i: int) -> dict:
    return {"prompt": f"question {i}?", "response": f"answer {i}."}


def test_submit_stores_data_once_as_a_blob_and_enqueues_a_small_payload(conn, settings):
    ds = Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n{"prompt": "there"}\n', "p.jsonl", settings.max_data_bytes)
    job = Q.build_job("memory", [ds], {"iterations": 5})
    sub = Q.submit(conn, settings, job, [ds])
    assert not sub.duplicate and sub.ticket == 1
    assert conn.get(blob_key(ds.sha256)) == ds.data
    rq_job = Job.fetch(sub.job_id, connection=conn, serializer=JSONSerializer)
    assert rq_job.func_name == "kd_worker.daemon.task.run_kd_job" and rq_job.timeout == settings.job_timeout
    assert rq_job.result_ttl == settings.result_ttl and rq_job.meta["ticket"] == 1
    assert len(json.dumps(rq_job.kwargs)) < 2000  # records are not in the payload
    assert conn.zscore(active_key("memory"), sub.job_id) == 1


def test_same_submission_is_deduplicated_and_restartable_after_failure(conn, settings):
    ds = Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n', "p.jsonl", settings.max_data_bytes)
    first = Q.submit(conn, settings, Q.build_job("memory", [ds]), [ds])
    again = Q.submit(conn, settings, Q.build_job("memory", [ds]), [ds])
    assert again.duplicate and again.job_id == first.job_id
    other = Q.submit(conn, settings, Q.build_job("memory", [ds], {"iterations": 7}), [ds])
    assert not other.duplicate and other.job_id != first.job_id
    Job.fetch(first.job_id, connection=conn, serializer=JSONSerializer).set_status("failed")
    retried = Q.submit(conn, settings, Q.build_job("memory", [ds]), [ds])
    assert not retried.duplicate and retried.job_id == first.job_id and retried.ticket == 3


@pytest.mark.parametrize("domain", ["../etc", "a/b", "", "Memory", "mémoire", "x" * 40])
def test_unsafe_domains_are_refused(settings, domain):
    ds = Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n', "p.jsonl", settings.max_data_bytes)
    with pytest.raises(ConfigError, match="domain"):
        Q.build_job(domain, [ds])


def test_bad_settings_and_data_fail_at_submit(settings):
    ds = Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n', "p.jsonl", settings.max_data_bytes)
    with pytest.raises(ConfigError, match="temprature.*did you mean 'temperature'"):
        Q.build_job("memory", [ds], {"temprature": 2})
    with pytest.raises(ConfigError, match="temperature"):
        Q.build_job("memory", [ds], {"temperature": 50})
    with pytest.raises(DataError, match="exceeds KD_MAX_DATA_BYTES"):
        Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n' * 10, "big.jsonl", 20)
    with pytest.raises(DataError, match="line 1: prompt: must not be empty"):
        Q.prepare_dataset("prompts", b'{"prompt": "  "}\n', "e.jsonl", 1000)


def test_cancel_a_queued_job(conn, settings):
    ds = Q.prepare_dataset("prompts", b'{"prompt": "hi"}\n', "p.jsonl", settings.max_data_bytes)
    sub = Q.submit(conn, settings, Q.build_job("memory", [ds]), [ds])
    assert Q.cancel(conn, sub.job_id) == "canceled"
    assert Job.fetch(sub.job_id, connection=conn, serializer=JSONSerializer).get_status() == "canceled"
    rows = Q.list_jobs(conn, settings, {"canceled"})
    assert [r["id"] for r in rows] == [sub.job_id]


def test_corrections_accumulate_into_one_job_at_the_threshold(conn, settings):
    kd = KDClient(settings, connection=conn)
    assert kd.submit_corrections("memory", [corr(1)]) == []
    assert kd.submit_corrections("memory", [corr(2)]) == []
    assert kd.pending()["memory"] == 2
    receipts = kd.submit_corrections("memory", [corr(3)])
    assert len(receipts) == 1 and not receipts[0].spooled
    job = Job.fetch(receipts[0].job_id, connection=conn, serializer=JSONSerializer)
    ref = job.kwargs["payload"]["data"][0]
    assert ref["kind"] == "corrections" and ref["records"] == 3
    lines = conn.get(blob_key(ref["sha256"])).decode().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == ["question 1?", "question 2?", "question 3?"]
    assert kd.pending() == {"outbox": 0}


def test_age_trigger_and_explicit_flush(conn, tmp_path):
    s = ClientSettings(spool_dir=tmp_path / "s", accumulate_threshold=100, accumulate_max_age_s=60)
    kd = KDClient(s, connection=conn)
    assert kd.submit_corrections("debug", [corr(1)]) == []
    since = tmp_path / "s" / "accum" / "debug.since"
    since.write_text(str(float(since.read_text()) - 61))  # the oldest record is now a minute old
    receipts = kd.submit_corrections("debug", [corr(2)])
    assert len(receipts) == 1
    kd2 = KDClient(ClientSettings(spool_dir=tmp_path / "t", accumulate_threshold=100), connection=conn)
    kd2.submit_corrections("task", [corr(9)])
    assert len(kd2.flush()) == 1


def test_invalid_records_are_refused_before_anything_is_accepted(conn, settings):
    kd = KDClient(settings, connection=conn)
    with pytest.raises(DataError, match='needs a "response"'):
        kd.submit_corrections("memory", [corr(1), {"prompt": "no answer"}])
    with pytest.raises(DataError):
        kd.submit_corrections("memory", [{"prompt": 3, "response": "x"}])
    with pytest.raises(ConfigError):
        kd.submit_corrections("../x", [corr(1)])
    assert kd.pending() == {"outbox": 0}  # nothing half-accepted


def test_unreachable_redis_spools_durably_and_delivers_later(settings):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    kd = KDClient(settings, connection=dead)
    receipt = kd.submit("memory", prompts=[{"prompt": "hello"}])
    assert receipt.spooled and receipt.job_id is None
    for i in range(3):
        kd.submit_corrections("memory", [corr(i)])
    assert kd.pending()["outbox"] == 2  # the prompt job and one corrections batch
    live = fakeredis.FakeRedis()
    later = KDClient(settings, connection=live)  # e.g. EGO restarted; the spool is on disk
    delivered = later.flush()
    assert len(delivered) == 2 and all(r.job_id for r in delivered)
    assert later.pending() == {"outbox": 0}
    again = KDClient(settings, connection=live)
    again.submit("memory", prompts=[{"prompt": "hello"}])
    assert len(Q.all_job_ids(live, settings)) == 2  # redelivery is idempotent (same content, same job)
