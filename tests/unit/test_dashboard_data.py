"""The dashboard's data layer: adapters_kd/ read through jobs.publisher, Redis through
kd_client.queue (fakeredis), and what is left when Redis is unreachable."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from helpers import beat, enqueue, publish_version
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs import publisher
from kd_client import queue as Q
from kd_client.dashboard import data
from kd_client.settings import ClientSettings


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "adapters_kd"


@pytest.fixture
def settings(root) -> ClientSettings:
    return ClientSettings(adapters_dir=root, redis_url="redis://127.0.0.1:6379/0")


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def test_overview_reads_domains_from_disk_with_a_kl_trend(root, settings, conn):
    for i in range(3):
        publish_version(root, "memory", i)
    publish_version(root, "debug", 0)
    publisher.rollback(root, "memory", 2)
    view = data.overview(root, conn, settings)
    rows = {d.domain: d for d in view.domains}
    assert list(rows) == ["debug", "memory"]
    mem = rows["memory"]
    assert mem.current is not None and mem.current.number == 2 and mem.rolled_back_from == 3
    assert mem.trend == pytest.approx([0.5, 0.25, 0.5 / 3])  # oldest version first
    assert mem.current.after["kl"] == pytest.approx(0.25) and mem.current.job_id == "kd-memory-" + "1".zfill(20)
    assert view.redis.ok and view.disk_error is None


def test_overview_counts_queues_per_priority_and_lists_workers_and_recent_jobs(root, settings, conn):
    enqueue(conn, settings, "memory", "high", 1)
    enqueue(conn, settings, "memory", "normal", 2)
    enqueue(conn, settings, "debug", "normal", 3)
    beat(conn, "w1", ["kd:high", "kd", "kd:low"])
    view = data.overview(root, conn, settings)
    depth = {q.priority: (q.name, q.queued) for q in view.queues}
    assert depth == {"high": ("kd:high", 1), "normal": ("kd", 2), "low": ("kd:low", 0)}
    assert [w["name"] for w in view.workers] == ["w1"]
    assert len(view.jobs) == 3 and {j["domain"] for j in view.jobs} == {"memory", "debug"}


def test_with_redis_unreachable_the_published_adapters_still_show(root, settings):
    publish_version(root, "memory", 0)
    dead = Q.connect(ClientSettings(redis_url="redis://127.0.0.1:1/0"), retries=0)  # nothing listens on port 1
    view = data.overview(root, dead, settings)
    assert not view.redis.ok and "ConnectionError" in (view.redis.error or "")
    assert [d.domain for d in view.domains] == ["memory"] and view.domains[0].current.number == 1
    assert view.workers == [] and view.queues == [] and view.jobs == []


def test_a_corrupt_summary_is_reported_and_domains_are_read_from_their_directories(root, settings, conn):
    publish_version(root, "memory", 0)
    (root / publisher.SUMMARY).write_text("{not json")
    view = data.overview(root, conn, settings)
    assert "kd_summary.json" in (view.disk_error or "") and "JSON" in (view.disk_error or "")
    assert [d.domain for d in view.domains] == ["memory"] and view.domains[0].current.number == 1


def test_the_redis_url_is_shown_without_its_password():
    assert data.redacted("redis://:s3cret@db.local:6380/2") == "redis://db.local:6380/2"
    assert data.redacted("unix:///run/redis.sock?password=s3cret") == "unix:///run/redis.sock"


def test_domain_page_shows_versions_the_selected_one_and_samples_of_current_and_previous(root):
    for i in range(3):
        publish_version(root, "memory", i)
    page = data.domain_page(root, "memory")
    assert [r.number for r in page.versions] == [3, 2, 1] and page.versions[0].current
    assert page.selected.row.number == 3 and page.selected.verified and page.selected.problem is None
    assert page.selected.metrics["train"][0]["loss"] == 3.0
    assert [(row.number, [s["after"] for s in samples]) for row, samples in page.samples] == [
        (3, ["after 2", "after 2"]),
        (2, ["after 1", "after 1"]),
    ]
    assert data.domain_page(root, "memory", selected=1).selected.row.number == 1
    assert data.domain_page(root, "memory", selected=99).selected.row.number == 3  # unknown: the current one
    assert data.domain_page(root, "debug") is None


def test_after_a_rollback_the_previous_version_is_the_one_before_current(root):
    for i in range(3):
        publish_version(root, "memory", i)
    publisher.rollback(root, "memory", 2)
    page = data.domain_page(root, "memory")
    assert [row.number for row, _ in page.samples] == [2, 1]


def test_a_modified_version_fails_verification_on_its_page(root):
    v = publish_version(root, "memory", 0)
    (v.path / publisher.WEIGHTS).write_bytes(b"tampered")
    page = data.domain_page(root, "memory")
    assert not page.selected.verified and "does not match its manifest" in (page.selected.problem or "")


def test_current_samples_or_why_there_are_none(root):
    assert data.current_samples(root, "memory") == ([], "nothing published for memory")
    publish_version(root, "memory", 0, samples=0)
    samples, problem = data.current_samples(root, "memory")
    assert samples == [] and "has no samples" in (problem or "")
    publish_version(root, "memory", 1, samples=3)
    samples, problem = data.current_samples(root, "memory")
    assert problem is None and [s["prompt"] for s in samples] == [f"v1 prompt {k}" for k in range(3)]


def test_a_waiting_job_knows_its_place_and_whether_a_worker_serves_its_queue(conn, settings):
    enqueue(conn, settings, "memory", "high", 1)
    first = enqueue(conn, settings, "memory", "normal", 2)
    second = enqueue(conn, settings, "memory", "normal", 3)
    job = Job.fetch(second, connection=conn, serializer=JSONSerializer)
    w = Q.waiting(conn, settings, job)
    assert (w.queue, w.position, w.queued, w.ahead_higher, w.workers) == ("kd", 2, 2, 1, 0)
    lines = Q.waiting_lines(w)
    assert lines[0] == "waiting: position 2 of 2 in kd (1 job in higher-priority queues first); 0 live workers serve kd"
    assert lines[1].startswith("no live worker serves queue kd") and "kd-worker run" in lines[1]
    beat(conn, "busy-elsewhere", ["other"])
    beat(conn, "leaving", ["kd"], shutting_down=True)
    assert Q.waiting(conn, settings, job).workers == 0
    beat(conn, "w1", ["kd:high", "kd", "kd:low"])
    w = Q.waiting(conn, settings, job)
    assert w.workers == 1 and Q.waiting_lines(w) == [
        "waiting: position 2 of 2 in kd (1 job in higher-priority queues first); 1 live worker serves kd"
    ]
    first_w = Q.waiting(conn, settings, Job.fetch(first, connection=conn, serializer=JSONSerializer))
    assert first_w.position == 1


def test_job_page_reports_waiting_lines_and_whether_it_can_be_canceled(conn, settings):
    job_id = enqueue(conn, settings, "memory")
    page = data.job_page(conn, settings, job_id)
    assert page.row["status"] == "queued" and page.cancellable and not page.final
    assert page.waiting[0].startswith("waiting: position 1 of 1 in kd") and len(page.waiting) == 2
    Q.cancel(conn, job_id)
    page = data.job_page(conn, settings, job_id)
    assert page.final and not page.cancellable and page.waiting == []
    assert data.job_page(conn, settings, "kd-memory-" + "f" * 20) is None


def test_summary_samples_prints_each_current_versions_samples(root, capsys):
    from argparse import Namespace

    from kd_client.cli import cmd_summary  # not main(): it configures structlog onto the captured stderr

    publish_version(root, "memory", 0, samples=2)
    publish_version(root, "debug", 0, samples=0)
    settings = ClientSettings(adapters_dir=root)
    assert cmd_summary(Namespace(json=False, samples=True), settings) == 0
    out = capsys.readouterr().out
    assert out.count("sample ") == 2 and "prompt:   v0 prompt 1" in out and "after:    after 0" in out
    assert "v1 has no samples" in out  # debug: published without samples
    assert cmd_summary(Namespace(json=False, samples=False), settings) == 0
    assert "sample " not in capsys.readouterr().out
