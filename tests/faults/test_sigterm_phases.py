"""SIGTERM (launchd/systemd stopping the service) in each phase of a job: the worker exits 0
well inside the service's grace period (KD_SHUTDOWN_GRACE: the time between SIGTERM and
SIGKILL). Generation, scoring and the publish gate stop at their next batch (generation also
every 32 decode steps) with their work kept, and the job is requeued at the front and resumed by
the next worker; publishing is short and not interruptible, so the job finishes first. (SIGTERM
during training: test_daemon.py.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from faultkit import PHASED, WARMUP, assert_consistent, phased_data, staging_dirs, submit, version_numbers
from helpers import SAMPLES, connect, row, wait_for, wait_phase, wait_status

GRACE = 20  # seconds; the service files give KD_SHUTDOWN_GRACE (60 by default) between SIGTERM and SIGKILL


def stop_within_grace(w) -> None:
    w.signal(signal.SIGTERM)
    assert w.wait(timeout=GRACE) == 0  # a requested stop: supervisors do not restart it


def test_sigterm_in_each_phase_requeues_or_finishes_within_the_grace_period(env, worker, tmp_path):
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    env = dict(env, KD_SHUTDOWN_GRACE=str(GRACE))
    w = worker(base=env)
    warm = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides=WARMUP)
    wait_status(conn, warm, {"finished"})
    data = phased_data(tmp_path)
    job = submit(env, "memory", **data, overrides=PHASED, force_publish=True)

    for phase, event in (("generate", "teacher_responses"), ("score", "teacher_targets")):
        since = time.time()
        done = wait_phase(conn, job, phase, min_step=1, since=since)["step"]
        stop_within_grace(w)
        assert row(conn, job)["status"] == "queued"  # requeued at the front, not failed
        assert conn.lindex("rq:queue:kd", 0).decode() == job
        assert "teacher phase" in w.events("job_interrupted")[-1]["reason"]
        w = worker(base=env)
        resumed = w.wait_event(event)[-1]
        assert resumed["cached"] >= done  # the batches finished before the stop are not redone

    # validation (the publish gate) stops at its next evaluation batch: the job is requeued and the
    # next worker gates it again without retraining; a gate that finished first just publishes
    wait_phase(conn, job, "validate", since=time.time())
    stop_within_grace(w)
    w = worker(base=env)
    st = wait_status(conn, job, {"finished"})
    assert st["outcome"]["published"] and st["outcome"]["gate"]["published_version"] == 1
    if w.events("training_resumed"):  # it was interrupted in the gate: nothing was trained again
        assert w.events("training_resumed")[-1]["step"] == PHASED["iterations"]

    # publishing: a second job of the domain (teacher work cached) is stopped while it stages
    again = submit(env, "memory", **data, overrides={**PHASED, "learning_rate": 2e-4}, force_publish=True)
    wait_for(
        lambda: any(any(s.iterdir()) for s in staging_dirs(adapters, "memory")),
        120,
        interval=0.005,
        what="the second version's staging directory",
    )
    stop_within_grace(w)
    assert wait_status(conn, again, {"finished"}, timeout=5)["outcome"]["version"] == 3
    assert version_numbers(adapters, "memory") == [1, 2, 3]
    assert assert_consistent(adapters, "memory")["job_id"] == again
