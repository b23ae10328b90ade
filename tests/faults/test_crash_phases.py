"""kill -9 of a real `kd-worker run` in each phase of one job (generation, scoring, validation,
publishing): every restart resumes the job from what the previous run saved, and no version is
ever half-published. (kill -9 during training: tests/integration/test_daemon.py.)

The signal is sent when the job's own progress in job.meta (polled in Redis every 10 ms) says
it is in the phase, or, for publishing, once the version's staging directory holds files; after
the kill, the test checks that the worker really died in that phase."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from faultkit import (
    PHASED,
    WARMUP,
    assert_consistent,
    current_version,
    meta_phase,
    phased_data,
    staging_dirs,
    submit,
    version_numbers,
)
from helpers import SAMPLES, connect, wait_for, wait_phase, wait_status

from jobs.models import health_key


def test_kill9_in_every_phase_resumes_from_its_checkpoint_and_publishes_once(env, worker, tmp_path):
    conn, adapters, name = connect(env), Path(env["KD_ADAPTERS_DIR"]), "kd-crashy"
    w = worker(name=name)
    restarted = [0.0]

    def kill(w) -> None:
        w.signal(signal.SIGKILL)
        w.wait(30)

    def restart():
        wait_for(lambda: not conn.exists(health_key(name)), 10, what="the killed worker's health key to lapse")
        restarted[0] = time.time()
        w = worker(name=name)
        assert w.events("orphans_recovered")[0]["jobs"] == [job]  # rq's abandoned-job path requeued it
        return w

    warm = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides=WARMUP)
    wait_status(conn, warm, {"finished"})
    assert current_version(adapters, "memory") == 1  # so the next job validates against v1
    # force: the gate's validation runs, and its verdict cannot keep the version out
    job = submit(env, "memory", **phased_data(tmp_path), overrides=PHASED, force_publish=True, max_attempts=6)

    # 1. generation: at least one batch of responses generated (and cached), not all
    generated = wait_phase(conn, job, "generate", min_step=PHASED["gen_batch_size"])["step"]
    kill(w)
    assert meta_phase(conn, job) == "generate"
    w = restart()
    scored = wait_phase(conn, job, "score", min_step=1, since=restarted[0])["step"]
    resumed = w.events("teacher_responses")[-1]
    assert resumed["cached"] >= generated and resumed["to_generate"] == 24 - resumed["cached"]

    # 2. scoring: at least one batch of soft targets cached
    kill(w)
    assert meta_phase(conn, job) == "score"
    w = restart()
    wait_phase(conn, job, "train", min_step=1, since=restarted[0])
    assert w.events("teacher_responses")[-1]["to_generate"] == 0
    assert w.events("teacher_targets")[-1]["cached"] >= scored

    # 3. validation: the publish gate evaluates v1 on the held-out data (under the publish lock)
    wait_phase(conn, job, "validate", since=restarted[0])
    kill(w)
    assert meta_phase(conn, job) == "validate"  # died before publishing began
    assert not staging_dirs(adapters, "memory") and version_numbers(adapters, "memory") == [1]
    w = restart()
    assert w.wait_event("training_resumed")[0]["step"] == PHASED["iterations"]  # every step was checkpointed

    # 4. publishing: the new version is being staged
    def staging_with_files():
        return any(any(s.iterdir()) for s in staging_dirs(adapters, "memory"))

    wait_for(staging_with_files, 120, interval=0.005, what="the new version's staging directory")
    kill(w)
    assert staging_dirs(adapters, "memory"), "killed after the rename: the publish window was missed"
    assert version_numbers(adapters, "memory") == [1] and current_version(adapters, "memory") == 1
    assert previous_version_intact(adapters)["version"] == 1
    w = restart()

    st = wait_status(conn, job, {"finished"}, timeout=240)
    assert st["outcome"]["published"] and st["outcome"]["version"] == 2
    entry = assert_consistent(adapters, "memory")  # the staging debris is gone, v2 is whole and current
    assert version_numbers(adapters, "memory") == [1, 2] and entry["job_id"] == job
    metrics = json.loads((adapters / "memory" / "versions" / "0002" / "kd_metrics.json").read_text())
    assert metrics["timing"]["resumed_from"] == PHASED["iterations"] and len(metrics["train"]) == PHASED["iterations"]
    assert w.events("teacher_targets")[-1]["to_score"] == 0
    assert w.events("stale_publish_lock_broken")  # the lock the killed run held did not stall the publish


def previous_version_intact(adapters: Path) -> dict:
    """Right after a kill mid-publish: the previous version is whole, current, and in the summary."""
    from jobs import publisher

    current = publisher.resolve(adapters, "memory")
    publisher.verify(current.path)
    return publisher.read_summary(adapters)["domains"]["memory"]


def test_a_job_that_keeps_killing_its_worker_is_failed_after_max_attempts(env, worker):
    """A poison job (here: killed in training every run) runs KD_MAX_ATTEMPTS times, then is failed."""
    conn, name = connect(env), "kd-poisoned"
    job = submit(
        env,
        "debug",
        prompts=[SAMPLES / "debug.jsonl"],
        max_attempts=2,
        overrides={"iterations": 5000, "save_every": 50, "val_every": 100000},
    )
    for attempt in range(2):
        since = time.time()
        w = worker(name=name)
        assert [e["jobs"] for e in w.events("orphans_recovered")] == ([[job]] if attempt else [])
        wait_phase(conn, job, "train", min_step=1, since=since)
        w.signal(signal.SIGKILL)
        w.wait(30)
        wait_for(lambda: not conn.exists(health_key(name)), 10, what="the killed worker's health key to lapse")
    w = worker(name=name)
    st = wait_status(conn, job, {"failed"}, timeout=30)
    assert "AbandonedJobError" in st["error"], st["error"]
    other = submit(env, "task", prompts=[SAMPLES / "task.jsonl"])
    assert wait_status(conn, other, {"finished"})["outcome"]["published"]  # the worker lives on
    assert not w.events("job_failed")  # the poison job never ran a third time
