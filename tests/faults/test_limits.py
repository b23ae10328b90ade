"""Jobs over their time or memory budget fail cleanly (a typed error, not retried: they would
fail again) and the worker goes on with the next job, of the same domain too."""

from __future__ import annotations

import json
from pathlib import Path

from faultkit import submit, write_prompts
from helpers import SAMPLES, connect, row, wait_status


def test_a_job_over_its_timeout_fails_and_the_next_job_of_the_domain_runs(env, worker):
    conn = connect(env)
    w = worker()
    slow = submit(
        env,
        "memory",
        prompts=[SAMPLES / "memory.jsonl"],
        job_timeout=4,
        max_attempts=3,
        overrides={"iterations": 100000, "save_every": 1000, "val_every": 100000},
    )
    after = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"])
    st = wait_status(conn, slow, {"failed"}, timeout=120)
    assert "JobTimeoutException" in st["error"] and "(4 seconds)" in st["error"], st["error"]
    assert (st["progress"] or {}).get("phase") in {"generate", "score", "train"}  # killed mid-work
    assert wait_status(conn, after, {"finished"})["outcome"]["published"]  # not blocked by the dead ticket
    assert row(conn, slow)["status"] == "failed"  # retries were left (max_attempts=3), none was used
    assert [e["error_type"] for e in w.events("job_failed")] == ["JobTimeoutException"]
    assert w.proc.poll() is None


def test_a_job_over_the_memory_budget_fails_and_smaller_jobs_still_run(env, worker, tmp_path):
    """KD_MAX_JOB_MEMORY=300 MB: the sample job peaks at ~40 MB of MLX memory (models included);
    64 prompts trained in batches of 64 with 256-token responses peak near 1 GB."""
    conn = connect(env)
    w = worker(KD_MAX_JOB_MEMORY=str(300 * 1024 * 1024))
    big = submit(
        env,
        "memory",
        prompts=[write_prompts(tmp_path / "many.jsonl", 64)],
        max_attempts=3,
        overrides={"batch_size": 64, "gen_batch_size": 64, "gen_max_tokens": 256},
    )
    small = submit(env, "debug", prompts=[SAMPLES / "debug.jsonl"])
    st = wait_status(conn, big, {"failed"}, timeout=180)
    assert "ResourceLimitExceeded" in st["error"] and "KD_MAX_JOB_MEMORY=314,572,800" in st["error"], st["error"]
    assert wait_status(conn, small, {"finished"})["outcome"]["published"]
    metrics = json.loads((Path(row(conn, small)["outcome"]["adapter_path"]) / "kd_metrics.json").read_text())
    assert metrics["timing"]["peak_memory_bytes"] < 300 * 1024 * 1024
    assert [e["error_type"] for e in w.events("job_failed")] == ["ResourceLimitExceeded"]  # failed once, not retried
    assert w.proc.poll() is None
