"""Redis going away under a running worker, with the shipped launchd/redis.conf (AOF everysec,
noeviction, loopback only): queued jobs survive a restart, the running job finishes or is
recovered, the worker reconnects by itself (never exits), and producers spool meanwhile."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from faultkit import current_version, submit, version_numbers
from helpers import SAMPLES, SHIPPED_REDIS_CONF, RedisServer, WorkerProcess, connect, row, wait_phase, wait_status

from kd_client.api import KDClient


def test_redis_restart_keeps_queued_jobs_and_the_worker_reconnects(env, worker, shipped_redis):
    env = dict(env, KD_REDIS_URL=shipped_redis.url)
    conn = connect(env)
    w = worker(base=env)
    running = submit(
        env,
        "memory",
        prompts=[SAMPLES / "memory.jsonl"],
        overrides={"iterations": 150, "save_every": 10, "val_every": 100000},
    )
    queued = [submit(env, d, prompts=[SAMPLES / f"{d}.jsonl"]) for d in ("debug", "task")]
    wait_phase(conn, running, "train", min_step=5)
    shipped_redis.stop(signal.SIGKILL)  # unclean: only the AOF keeps the queue
    w.wait_event("heartbeat_failed")  # the worker noticed while its job kept training
    shipped_redis.start()
    assert [j.decode() for j in conn.lrange("rq:queue:kd", 0, -1)] == queued  # survived, in order
    for job in [running, *queued]:
        assert wait_status(conn, job, {"finished"}, timeout=240)["outcome"]["published"]
    assert w.proc.poll() is None  # reconnected by itself
    assert [current_version(Path(env["KD_ADAPTERS_DIR"]), d) for d in ("memory", "debug", "task")] == [1, 1, 1]


def test_redis_away_for_a_while_the_worker_waits_and_producers_spool(env, worker, shipped_redis, tmp_path):
    """Redis stops while a job trains; the job's publish step needs Redis (ordering), so the worker
    waits for it; EGO's submissions are spooled; all of it completes once Redis is back."""
    env = dict(env, KD_REDIS_URL=shipped_redis.url)
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    w = worker(base=env)
    job = submit(
        env,
        "memory",
        prompts=[SAMPLES / "memory.jsonl"],
        overrides={"iterations": 60, "save_every": 10, "val_every": 100000},
    )
    wait_phase(conn, job, "train", min_step=1)
    shipped_redis.stop(signal.SIGTERM)
    w.wait_event("redis_unavailable", timeout=120, count=3)  # the job's work ended; the worker waits, backing off

    ego = KDClient(
        submitter="ego",
        redis_url=shipped_redis.url,
        spool_dir=tmp_path / "ego-spool",
        accumulate_threshold=2,
        retry_backoff_s=0.0,
        connect_timeout=0.5,
        socket_timeout=1.0,
    )
    receipts = ego.submit_corrections("debug", [{"prompt": f"q{i}?", "response": f"a{i}."} for i in range(2)])
    assert receipts == []  # nothing delivered: one job waits in the outbox
    direct = ego.submit(
        "task", prompts=[json.loads(line) for line in (SAMPLES / "task.jsonl").read_text().splitlines()]
    )
    assert direct.spooled and direct.job_id is None
    assert ego.pending() == {"outbox": 2}

    shipped_redis.start()
    delivered = ego.flush()
    assert len(delivered) == 2 and all(not r.spooled for r in delivered) and ego.pending() == {"outbox": 0}
    for job_id in [job, *(r.job_id for r in delivered)]:
        assert wait_status(conn, job_id, {"finished"}, timeout=240)["outcome"]["published"]
    assert w.proc.poll() is None  # it waited; it did not exit
    assert version_numbers(adapters, "memory") == [1]  # the interrupted job published exactly once
    assert row(conn, job)["outcome"]["version"] == 1


def test_a_worker_started_before_redis_waits_for_it(env, tmp_path):
    """Boot order is not guaranteed (launchd starts agents in any order): no crash, no exit."""
    server = RedisServer(tmp_path / "late-redis", config=SHIPPED_REDIS_CONF)  # its port is chosen, not yet listening
    env = dict(env, KD_REDIS_URL=server.url)
    w = WorkerProcess(env, tmp_path / "early-worker.log").launch()
    try:
        w.wait_event("redis_unavailable", timeout=120, count=2)
        server.start()
        w.wait_event("worker_started", timeout=60)
        job = submit(env, "memory", prompts=[SAMPLES / "memory.jsonl"])
        assert wait_status(connect(env), job, {"finished"})["outcome"]["published"]
    finally:
        w.stop()
        server.stop()
