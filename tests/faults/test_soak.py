"""Slow (`make test-slow`): a seeded storm of faults on two workers sharing one Redis with the
shipped config, while eight jobs of two domains run: kill -9 and SIGTERM of either worker and
kill -9 of redis-server (20 faults), each while some job is working. Afterwards every job has finished,
each published version is whole and appears once, versions follow submission order, and both
workers are alive."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from faultkit import assert_consistent, submit
from helpers import SAMPLES, connect, row, wait_for, wait_status

from jobs import publisher
from jobs.models import health_key

SEED = 20261126
FAULTS = 20
DOMAINS = ("memory", "debug")


@pytest.mark.slow
def test_a_seeded_storm_of_kills_stops_and_redis_restarts_loses_nothing(env, worker, shipped_redis):
    rng = random.Random(SEED)
    env = dict(env, KD_REDIS_URL=shipped_redis.url)
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    jobs = [
        submit(
            env,
            DOMAINS[i % 2],
            prompts=[SAMPLES / f"{DOMAINS[i % 2]}.jsonl"],
            force_publish=True,
            overrides={"seed": i, "iterations": 120, "save_every": 5, "val_every": 100000},
            max_attempts=12,
        )
        for i in range(8)
    ]
    procs = {name: worker(name=name, base=env) for name in ("kd-a", "kd-b")}
    faults = []
    for _ in range(FAULTS):
        since = time.time()

        def working(since=since):
            rows = [row(conn, j) for j in jobs]
            if all(r["status"] == "finished" for r in rows):
                return "done"
            busy = [
                r for r in rows if (r.get("progress") or {}).get("updated_at", 0) > since and r["status"] == "started"
            ]
            return busy and "busy"

        if wait_for(working, 240, interval=0.05, what="a job at work") == "done":
            break
        action, name = rng.choice(("kill", "term", "redis")), rng.choice(sorted(procs))
        faults.append((action, name))
        if action == "redis":
            shipped_redis.stop(signal.SIGKILL)
            shipped_redis.start()
            continue
        procs[name].signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
        code = procs[name].wait(60)
        assert action == "kill" or code == 0
        wait_for(lambda name=name: not conn.exists(health_key(name)), 15, what=f"{name}'s health key to lapse")
        procs[name] = worker(name=name, base=env)
    for job in jobs:
        wait_status(conn, job, {"finished"}, timeout=600)
    assert all(p.proc.poll() is None for p in procs.values()), faults
    for domain in DOMAINS:
        assert_consistent(adapters, domain)
        published = [publisher.verify(v.path)["summary"] for v in publisher.versions(adapters, domain)]
        tickets = [row(conn, s["job_id"])["ticket"] for s in published]
        assert tickets == sorted(tickets) and len(set(tickets)) == len(tickets), (domain, tickets, faults)
        ids = [s["job_id"] for s in published]
        for job in jobs:
            o = row(conn, job)["outcome"]
            if o["domain"] == domain:  # published exactly once, or stepped aside for a newer submission
                ok = ids.count(job) == 1 if o["published"] else o["gate"]["reason"].startswith("superseded")
                assert ok, (job, o, faults)
    assert len(faults) >= FAULTS // 2, faults  # the storm really happened
