"""Queue benchmark: submit->start latency on an idle worker, enqueue throughput for 1,000
submissions, and the worker's overhead per job beyond the engine's own time.

    .venv/bin/python -m bench.queue [--jobs 8] [--submissions 1000]

Starts its own redis-server (shipped config) and a real `kd-worker run` on the tiny models.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import report, wait_job

JOB_TIMEOUT = 120  # seconds for one 5-step job on the tiny models


def enqueue_throughput(url: str, spool: Path, n: int) -> list[list]:
    from kd_client import queue as Q
    from kd_client.api import KDClient
    from kd_client.settings import ClientSettings

    s = ClientSettings(redis_url=url, queue="bench-enqueue", spool_dir=spool)
    conn = Q.connect(s)
    ds = Q.prepare_dataset("prompts", b'{"prompt": "How important is this?"}\n' * 20, "p.jsonl", s.max_data_bytes)
    t = time.perf_counter()
    for i in range(n):
        Q.submit(conn, s, Q.build_job("memory", [ds], {"seed": i}), [ds])
    raw = time.perf_counter() - t
    kd = KDClient(s, connection=conn)
    t = time.perf_counter()
    for i in range(n):
        kd.submit("debug", prompts=[{"prompt": f"Why did step {i} fail?"}])
    durable = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        Q.submit(conn, s, Q.build_job("memory", [ds], {"seed": i}), [ds])  # all duplicates now
    dedup = time.perf_counter() - t
    return [
        ["kd_client.queue.submit (validate, blob, ticket, enqueue)", n, raw, n / raw],
        ["KDClient.submit (+ fsynced outbox, then deliver)", n, durable, n / durable],
        ["duplicate submissions (detected, not enqueued)", n, dedup, n / dedup],
    ]


def job_latencies(url: str, workdir: Path, jobs: int) -> tuple[list[float], list[float], list[float]]:
    import json

    from kd_client import queue as Q
    from kd_client.settings import ClientSettings
    from kd_worker.fixtures.demo import child_env, managed_worker
    from kd_worker.fixtures.tinymodels import build_demo_models

    models = build_demo_models(workdir / "models", ("teacher", "student"))
    env = child_env(
        KD_REDIS_URL=url,
        KD_TEACHER=str(models["teacher"]),
        KD_STUDENT=str(models["student"]),
        KD_WORK_DIR=str(workdir / "work"),
        KD_ADAPTERS_DIR=str(workdir / "adapters"),
        KD_WORKER_NAME="bench",
        KD_KD_DEFAULTS=json.dumps({"iterations": 5, "gen_max_tokens": 16}),
    )
    s = ClientSettings(redis_url=url, spool_dir=workdir / "spool")
    conn = Q.connect(s)
    latency, overhead, wall = [], [], []
    with managed_worker(env, workdir / "worker.log"):
        for i in range(jobs):
            ds = Q.prepare_dataset(
                "prompts", f'{{"prompt": "Remember item {i}?"}}\n'.encode(), "p.jsonl", s.max_data_bytes
            )
            t0 = time.time()
            sub = Q.submit(conn, s, Q.build_job("memory", [ds], {"seed": i}), [ds])
            result = wait_job(conn, sub.job_id, JOB_TIMEOUT).latest_result()
            latency.append(result.execution_started_at.timestamp() - t0)
            run = (result.execution_ended_at - result.execution_started_at).total_seconds()
            wall.append(run)
            overhead.append(run - result.return_value["seconds"])
    return latency, overhead, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--submissions", type=int, default=1000)
    args = ap.parse_args()
    from kd_worker.fixtures.demo import managed_redis
    from kd_worker.settings import WorkerSettings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with managed_redis(WorkerSettings(), tmp, explicit_url=False) as url:
            throughput = enqueue_throughput(url, tmp / "spool", args.submissions)
            lat, over, wall = job_latencies(url, tmp, args.jobs)
    ms = lambda xs: [statistics.median(xs) * 1e3, max(xs) * 1e3]  # noqa: E731
    rows = [[name, n, secs, rate, "", ""] for name, n, secs, rate in throughput]
    rows += [
        ["submit -> job started (idle worker)", len(lat), "", "", *ms(lat)],
        ["worker overhead per job (rq + fetch + bookkeeping)", len(over), "", "", *ms(over)],
        ["job wall time in the worker (5 tiny steps)", len(wall), "", "", *ms(wall)],
    ]
    report(
        "queue", "queue: throughput and latency", ["what", "n", "seconds", "per second", "median ms", "max ms"], rows
    )


if __name__ == "__main__":
    main()
