"""adapters_kd/ failing at publish time: the job fails with a clear PublishError, the previous
version stays current, nothing partial is visible, the worker lives on, and the job's training
is kept (a resubmission reuses the cached teacher work and publishes).

Root ignores file permissions (tests and CI may run as root), so the faults here are ones root
cannot override: a per-process file-size limit (RLIMIT_FSIZE, set on the running worker with
prlimit(2): writes past it fail with EFBIG exactly like a full disk fails with ENOSPC), a write
onto /dev/full (a real ENOSPC), and a regular file where the domain's directory must be."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

import pytest
from faultkit import WARMUP, assert_consistent, current_version, staging_dirs, submit, version_numbers
from helpers import SAMPLES, connect, distill, engine_settings, row, wait_phase, wait_status

from jobs import publisher
from jobs.errors import PublishError

LIMIT = 256 * 1024  # bytes per file: the worker's log stays below it; a rank-64 adapter (~1 MB) does not


def test_a_write_failure_at_publish_keeps_the_previous_version_and_the_worker(env, worker):
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    w = worker()
    first = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides=WARMUP)
    wait_status(conn, first, {"finished"})
    over = {**WARMUP, "iterations": 6, "save_every": 3}
    with publisher.locked(adapters / "memory" / ".lock"):  # hold the domain lock, as a rollback would
        job = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides=over, force_publish=True)
        wait_phase(conn, job, "publish")  # the worker now waits for the lock inside the publisher
        soft, hard = resource.prlimit(w.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(w.proc.pid, resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        st = wait_status(conn, job, {"failed"}, timeout=60)
    finally:
        resource.prlimit(w.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert "PublishError" in st["error"] and "the previous version stays current" in st["error"], st["error"]
    assert version_numbers(adapters, "memory") == [1] and current_version(adapters, "memory") == 1
    assert not staging_dirs(adapters, "memory")
    assert assert_consistent(adapters, "memory")["job_id"] == first
    assert st["traceback"].count("Traceback") >= 1  # the submitter gets the whole story

    again = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"], overrides=over, force_publish=True)
    assert again == job  # a failed job is restartable under its id
    st = wait_status(conn, job, {"finished"})
    assert st["outcome"]["published"] and st["outcome"]["version"] == 2
    assert w.events("teacher_responses")[-1]["to_generate"] == 0  # the teacher's work was kept
    assert assert_consistent(adapters, "memory")["job_id"] == job
    assert w.proc.poll() is None


def test_a_full_disk_at_publish_is_reported_as_such(tmp_path):
    """ENOSPC from the kernel (a staged file backed by /dev/full): PublishError names the full disk."""
    root = tmp_path / "adapters_kd"

    def ok(stage: Path) -> None:
        (stage / "adapters.safetensors").write_bytes(b"v1")

    def disk_full(stage: Path) -> None:
        os.symlink("/dev/full", stage / "adapters.safetensors")
        with open(stage / "adapters.safetensors", "wb") as f:
            f.write(b"x" * 65536)

    publisher.publish(root, "memory", ok, {"job_id": "a"})
    with pytest.raises(PublishError, match=r"\(disk full\).*the previous version stays current"):
        publisher.publish(root, "memory", disk_full, {"job_id": "b"})
    assert current_version(root, "memory") == 1 and version_numbers(root, "memory") == [1]
    assert not staging_dirs(root, "memory")
    assert (root / "memory" / "adapters.safetensors").read_bytes() == b"v1"


def test_a_file_where_the_domain_directory_must_be_fails_the_job_clearly(env, worker):
    """adapters_kd/debug is a regular file (mkdir/rename fail even for root): that job fails with a
    PublishError, other domains keep publishing, the worker lives on."""
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    adapters.mkdir(parents=True)
    (adapters / "debug").write_text("not a directory\n")
    w = worker()
    bad = submit(env, "debug", prompts=[SAMPLES / "debug.jsonl"])
    good = submit(env, "task", prompts=[SAMPLES / "task.jsonl"])
    st = wait_status(conn, bad, {"failed"})
    assert "PublishError" in st["error"] and "debug" in st["error"], st["error"]
    assert wait_status(conn, good, {"finished"})["outcome"]["published"]
    assert (adapters / "debug").read_text() == "not a directory\n"
    assert row(conn, bad)["status"] == "failed" and w.proc.poll() is None


def test_a_retry_after_the_bookkeeping_of_a_publish_failed_does_not_publish_twice(tmp_path, models_root):
    """Redis goes away right after the version is live (the ordering guard's exit fails): the job
    raises, rq retries it, and the retry must find its own version instead of publishing another."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from kd_worker.daemon.runtime import Runtime

    settings = engine_settings(tmp_path)
    runtime = Runtime(settings)

    def run(publish_guard=contextlib.nullcontext) -> dict:  # one submission's queue retries, on one worker
        return distill(
            tmp_path,
            models_root,
            overrides={"iterations": 4, "save_every": 4, "gen_max_tokens": 8},
            run_id="job-1",
            job_id="job-1",
            reuse_outcome=True,
            settings=settings,
            runtime=runtime,
            publish_guard=publish_guard,
        )

    class RedisLostOnExit:
        def __enter__(self):
            return None

        def __exit__(self, *exc):
            raise RedisConnectionError("Connection closed by server.")

    with pytest.raises(RedisConnectionError):
        run(publish_guard=RedisLostOnExit)
    assert version_numbers(settings.adapters_dir, "memory") == [1]
    again = run()
    assert again["published"] and again["version"] == 1
    assert version_numbers(settings.adapters_dir, "memory") == [1]
