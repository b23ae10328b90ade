"""A job taken off its queue by a worker (or in Redis's last unsynced second) that died before
marking it started is "queued" in no queue; the worker's sweep requeues it."""

from __future__ import annotations

from faultkit import submit
from helpers import SAMPLES, connect, wait_status


def test_a_job_popped_by_a_dead_worker_is_requeued_and_finishes(env, worker):
    conn = connect(env)
    job = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"])
    assert conn.lpop("rq:queue:kd").decode() == job  # what a worker does just before it dies
    assert conn.hget(f"rq:job:{job}", "status") == b"queued" and conn.llen("rq:queue:kd") == 0
    w = worker(KD_LOST_JOB_GRACE="1")
    assert wait_status(conn, job, {"finished"})["outcome"]["published"]
    assert w.events("lost_jobs_requeued")[0]["jobs"] == [job]
