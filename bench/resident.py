"""Resident teacher: the daemon's second and later jobs vs a cold start of the same job.

cold      a fresh `kd-worker distill` process per job (interpreter, imports, model loads, job)
resident  the same jobs through one `kd-worker run` (teacher and student already in memory)
Both see a warm target cache (a first job fills it), so the difference is what residency saves.

    .venv/bin/python -m bench.resident [--jobs 4] [--shape tiny|medium]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import REPO, report, wait_job

DATA = REPO / "jobs" / "samples" / "memory.jsonl"
KD = {"iterations": 10, "gen_max_tokens": 32, "val_every": 10, "save_every": 10}
JOB_TIMEOUT = 1800  # seconds for one job (the medium shape included)


def lr(i: int) -> float:
    """Distinct jobs (no dedup) that share the teacher's cached work: only a training setting varies."""
    return 1e-4 * (1 + i / 1000)


def build(shape: str, root: Path) -> tuple[Path, Path]:
    from kd_worker.fixtures import tinymodels as tm

    if shape == "tiny":
        m = tm.build_demo_models(root, ("teacher", "student"))
        return m["teacher"], m["student"]
    t = replace(tm.SPECS["teacher"], name="teacher-medium", hidden_size=1024, num_layers=12, intermediate_size=2816)
    s = replace(tm.SPECS["student"], name="student-medium", hidden_size=512, num_layers=8, intermediate_size=1408)
    return tm.build_model(t, root / t.name), tm.build_model(s, root / s.name)


def cold_runs(env: dict, teacher: Path, student: Path, out: Path, jobs: int) -> list[float]:
    from kd_worker.fixtures.demo import venv_bin

    times = []
    for i in range(jobs + 1):
        sets = [a for k, v in {**KD, "learning_rate": lr(i)}.items() for a in ("--set", f"{k}={v}")]
        t = time.perf_counter()
        subprocess.run(
            [
                venv_bin("kd-worker"),
                "distill",
                "--domain",
                "memory",
                "--prompts",
                str(DATA),
                "--teacher",
                str(teacher),
                "--student",
                str(student),
                "--out",
                str(out),
                "--json",
                "--force",
                *sets,
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t)
    return times[1:]  # the first run fills the target cache


def resident_runs(env: dict, work: Path, jobs: int) -> tuple[list[float], float]:
    from kd_client import queue as Q
    from kd_client.settings import ClientSettings
    from kd_worker.fixtures.demo import managed_worker

    s = ClientSettings(redis_url=env["KD_REDIS_URL"], spool_dir=work / "spool")
    conn = Q.connect(s)
    ds = Q.prepare_dataset("prompts", DATA.read_bytes(), "memory.jsonl", s.max_data_bytes)
    times = []
    t_start = time.perf_counter()
    with managed_worker(env, work / "worker.log"):
        startup = time.perf_counter() - t_start
        for i in range(jobs + 1):
            sub = Q.submit(
                conn, s, Q.build_job("memory", [ds], {**KD, "learning_rate": lr(100 + i)}, force_publish=True), [ds]
            )
            r = wait_job(conn, sub.job_id, JOB_TIMEOUT).latest_result()
            times.append((r.execution_ended_at - r.execution_started_at).total_seconds())
    return times[1:], startup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--shape", choices=("tiny", "medium"), default="tiny")
    args = ap.parse_args()
    from kd_worker.fixtures.demo import child_env, managed_redis
    from kd_worker.settings import WorkerSettings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher, student = build(args.shape, tmp / "models")
        with managed_redis(WorkerSettings(), tmp, explicit_url=False) as url:
            env = child_env(
                KD_REDIS_URL=url,
                KD_TEACHER=str(teacher),
                KD_STUDENT=str(student),
                KD_WORK_DIR=str(tmp / "work"),
                KD_ADAPTERS_DIR=str(tmp / "adapters"),
                KD_WORKER_NAME="bench-resident",
            )
            cold = cold_runs(env, teacher, student, tmp / "cold-adapters", args.jobs)
            warm, startup = resident_runs(env, tmp, args.jobs)
    med_c, med_w = statistics.median(cold), statistics.median(warm)
    rows = [
        ["cold: fresh `kd-worker distill` per job", len(cold), med_c, min(cold), max(cold)],
        ["resident: job 2..N in `kd-worker run`", len(warm), med_w, min(warm), max(warm)],
        ["worker start-up (once): imports + teacher + student", 1, startup, startup, startup],
    ]
    report(
        f"resident_{args.shape}",
        f"resident teacher ({args.shape} models, {KD['iterations']} steps/job)",
        ["what", "jobs", "median s", "min s", "max s"],
        rows,
        {"speedup": med_c / med_w, "shape": args.shape, "kd": KD},
    )
    print(f"resident jobs are {med_c / med_w:.1f}x faster than cold starts")


if __name__ == "__main__":
    main()
