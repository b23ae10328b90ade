"""kd_worker/daemon/power.py: a Mac stays awake while a job runs, and only then. The darwin path runs on Linux
with the recorded fake of /usr/bin/caffeinate (tests/fakes/caffeinate), which logs how it was started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import fakeredis
import pytest
from helpers import REPO, wait_for
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from structlog.testing import capture_logs

from jobs.models import TASK_FUNC
from kd_worker.daemon import task
from kd_worker.daemon.power import KeepAwake
from kd_worker.daemon.runtime import JobControl
from kd_worker.daemon.worker import KDWorker

FAKE_CAFFEINATE = REPO / "tests" / "fakes" / "caffeinate"


@pytest.fixture
def caffeinate_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "caffeinate.log"
    monkeypatch.setenv("FAKE_CAFFEINATE_LOG", str(log))
    return log


def started(log: Path) -> list[tuple[int, list[str]]]:
    """Each caffeinate the fake saw start: (its pid, its arguments)."""
    if not log.exists():
        return []
    return [(int(pid), args.split()) for pid, _, args in (line.partition(" ") for line in log.read_text().splitlines())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def darwin_keep_awake(pid: int | None = None) -> KeepAwake:
    return KeepAwake(pid, platform="darwin", executable=FAKE_CAFFEINATE)


def test_the_assertion_is_caffeinate_i_s_w_pid_held_for_the_block_only(caffeinate_log):
    with darwin_keep_awake() as awake:
        proc = awake._proc
        [(pid, args)] = wait_for(lambda: started(caffeinate_log), timeout=10, what="caffeinate started")
        assert args == ["-i", "-s", "-w", str(os.getpid())]  # never -d
        assert proc is not None and pid == proc.pid and alive(pid)
    assert proc.returncode is not None and not alive(pid)  # terminated and reaped at the end of the block


def test_the_assertion_ends_with_the_process_it_watches(caffeinate_log):
    """-w PID: if the worker is killed before it can stop caffeinate, the assertion still ends."""
    worker = subprocess.Popen(["sleep", "60"])
    awake = darwin_keep_awake(worker.pid).__enter__()
    try:
        wait_for(lambda: started(caffeinate_log), timeout=10, what="caffeinate started")
        worker.kill()
        worker.wait()
        assert awake._proc is not None
        wait_for(lambda: awake._proc.poll() is not None, timeout=10, what="caffeinate gone with its worker")
    finally:
        awake.__exit__(None, None, None)


def test_off_darwin_nothing_is_started(caffeinate_log):
    with KeepAwake(platform="linux", executable=FAKE_CAFFEINATE) as awake:
        assert awake._proc is None
    assert started(caffeinate_log) == []


def test_a_missing_caffeinate_is_logged_and_the_job_goes_on(tmp_path):
    with capture_logs() as logs, KeepAwake(platform="darwin", executable=tmp_path / "caffeinate") as awake:
        assert awake._proc is None
    assert [e["event"] for e in logs] == ["power_assertion_unavailable"]


# --- wired into the worker: held while a job runs, never while idle --------------------------------


def run_worker(monkeypatch, job_body, jobs: int) -> tuple[list[Job], KDWorker]:
    conn = fakeredis.FakeRedis()
    queue = Queue("kd", connection=conn, serializer=JSONSerializer)
    meta = [{"ticket": i + 1, "domain": "memory", "submitter": "test"} for i in range(jobs)]  # what kd-client writes
    payloads = [{"n": i, "domain": "memory"} for i in range(jobs)]
    enqueued = [queue.enqueue(TASK_FUNC, kwargs={"payload": payloads[i]}, meta=meta[i]) for i in range(jobs)]
    monkeypatch.setattr(task, "run_kd_job", job_body)  # rq imports the allow-listed name at run time
    worker = KDWorker([queue], conn, JobControl(), keep_awake=darwin_keep_awake)
    worker.work(burst=True)
    return enqueued, worker


def test_worker_holds_the_assertion_during_each_job_and_releases_it_after(monkeypatch, caffeinate_log):
    seen_during: list[list[tuple[int, list[str]]]] = []

    def job_body(payload):
        # the fake logs its start once it runs: wait for this job's line (the job before wrote one too)
        n = len(seen_during) + 1
        seen_during.append(wait_for(lambda: len(started(caffeinate_log)) >= n and started(caffeinate_log), 10))
        assert all(alive(pid) for pid, _ in seen_during[-1][-1:])
        return "ok"

    jobs, worker = run_worker(monkeypatch, job_body, jobs=2)
    assert [j.get_status() for j in jobs] == [JobStatus.FINISHED, JobStatus.FINISHED]
    assert [len(s) for s in seen_during] == [1, 2]  # a fresh assertion for each job, already held when it ran
    assert all(args == ["-i", "-s", "-w", str(os.getpid())] for _, args in seen_during[-1])
    assert not any(alive(pid) for pid, _ in started(caffeinate_log))  # none left once the jobs ended


def test_a_failing_job_releases_the_assertion(monkeypatch, caffeinate_log):
    def job_body(payload):
        wait_for(lambda: started(caffeinate_log), timeout=10, what="caffeinate started")
        raise RuntimeError("boom")

    [job], _ = run_worker(monkeypatch, job_body, jobs=1)
    assert job.get_status() == JobStatus.FAILED
    [(pid, _)] = started(caffeinate_log)
    assert not alive(pid)


def test_an_idle_worker_holds_nothing(monkeypatch, caffeinate_log):
    run_worker(monkeypatch, lambda payload: None, jobs=0)
    assert started(caffeinate_log) == []


def test_the_worker_holds_the_real_assertion_by_default():
    worker = KDWorker([Queue("kd", connection=fakeredis.FakeRedis())], fakeredis.FakeRedis(), JobControl())
    awake = worker.keep_awake()
    assert isinstance(awake, KeepAwake) and awake.argv == ["/usr/bin/caffeinate", "-i", "-s", "-w", str(os.getpid())]
