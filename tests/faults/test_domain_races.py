"""Two workers racing for the same domain: publications follow submission order, a newer
submission is never replaced by an older one, the summary always names the current version,
and a worker that dies mid-race stalls nobody. (Two workers, two domains: test_daemon.py.)"""

from __future__ import annotations

import signal
from pathlib import Path

from faultkit import assert_consistent, submit, version_numbers
from helpers import SAMPLES, connect, row, wait_for, wait_phase, wait_status

from jobs import publisher
from jobs.models import health_key

PROMPTS = [SAMPLES / "memory.jsonl"]
LONG = {"iterations": 150, "save_every": 10, "val_every": 100000}
SHORT = {"iterations": 6, "save_every": 6, "val_every": 100000}


def job_of(adapters: Path, number: int) -> str:
    return publisher.verify(adapters / "memory" / "versions" / f"{number:04d}")["summary"]["job_id"]


def test_a_later_job_that_finishes_first_waits_for_the_earlier_one(env, worker):
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    a = worker(name="kd-a")
    first = submit(env, "memory", prompts=PROMPTS, overrides=LONG, force_publish=True)
    wait_phase(conn, first, "train", min_step=1)
    b = worker(name="kd-b")
    second = submit(env, "memory", prompts=PROMPTS, overrides=SHORT, force_publish=True)
    assert b.wait_event("publish_waiting")[0]["earlier"] == [first]  # trained first, waits its turn
    for job in (first, second):
        assert wait_status(conn, job, {"finished"})["outcome"]["published"]
    assert [row(conn, j)["worker"] for j in (first, second)] == ["kd-a", "kd-b"]
    assert version_numbers(adapters, "memory") == [1, 2]
    assert [job_of(adapters, 1), job_of(adapters, 2)] == [first, second]
    assert assert_consistent(adapters, "memory")["job_id"] == second
    assert a.proc.poll() is None and b.proc.poll() is None


def test_a_worker_killed_mid_race_stalls_nobody_and_the_older_job_steps_aside(env, worker):
    """kd-a dies (kill -9) with the earlier job while kd-b's later job waits for it: kd-b publishes
    once kd-a's heartbeat lapses; the recovered earlier job then finds a newer submission live
    and does not replace it."""
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    a = worker(name="kd-a")
    first = submit(env, "memory", prompts=PROMPTS, overrides=LONG, force_publish=True)
    wait_phase(conn, first, "train", min_step=1)
    b = worker(name="kd-b")
    second = submit(env, "memory", prompts=PROMPTS, overrides=SHORT, force_publish=True)
    b.wait_event("publish_waiting")
    a.signal(signal.SIGKILL)
    a.wait(30)
    assert wait_status(conn, second, {"finished"})["outcome"]["version"] == 1
    assert row(conn, first)["status"] == "started"  # what the crash left; nobody waited on it
    wait_for(lambda: not conn.exists(health_key("kd-a")), 10, what="kd-a's health key to lapse")
    a = worker(name="kd-a")
    st = wait_status(conn, first, {"finished"})
    assert not st["outcome"]["published"] and st["outcome"]["gate"]["reason"].startswith("superseded")
    assert version_numbers(adapters, "memory") == [1] and job_of(adapters, 1) == second
    assert assert_consistent(adapters, "memory")["job_id"] == second
