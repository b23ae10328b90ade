"""Exit codes (the service restart rule), worker names, and producers while Redis is away."""

from __future__ import annotations

import signal
import subprocess

from helpers import SAMPLES, RedisServer, WorkerProcess, connect, kd_client, venv_bin, wait_status


def test_requested_stop_exits_zero(worker):
    w = worker()
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0


def test_configuration_error_exits_78_so_supervisors_do_not_loop(env):
    bad = {k: v for k, v in env.items() if k != "KD_TEACHER"}
    out = subprocess.run([venv_bin("kd-worker"), "run"], env=bad, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "KD_TEACHER is not set" in out.stderr
    bad = dict(env, KD_REDIS_URL="http://nope")
    out = subprocess.run([venv_bin("kd-worker"), "run"], env=bad, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "KD_REDIS_URL" in out.stderr


def test_unexpected_end_of_the_work_loop_exits_nonzero(env, worker):
    """rq's work() returns on errors it does not handle; the worker must not exit 0 then. (A queue
    key of the wrong type no longer ends it: it is waited out, tests/faults/test_hostile_state.py.)"""
    w = worker()
    conn = connect(env)
    conn.execute_command("ACL", "SETUSER", "default", "-blpop")  # NOPERM on the next dequeue
    try:
        conn.lpush("rq:queue:kd:high", "nudge")  # wake the blocking dequeue
        assert w.wait(60) == 1
    finally:
        conn.execute_command("ACL", "SETUSER", "default", "+@all")


def test_a_live_worker_name_is_refused(env, worker):
    worker()
    out = subprocess.run([venv_bin("kd-worker"), "run"], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 78 and "is alive" in out.stderr


def test_submissions_spool_while_redis_is_down_and_are_delivered_after(env, worker, tmp_path):
    server = RedisServer(tmp_path / "late-redis")  # its port is chosen, not yet listening
    down = dict(env, KD_REDIS_URL=server.url)
    out = kd_client(down, "submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl"))
    assert out.returncode == 75 and "spooled" in out.stdout
    assert len(list((tmp_path / "spool" / "outbox").iterdir())) == 1
    server.start()
    try:
        out = kd_client(down, "flush")
        assert out.returncode == 0 and "still spooled: 0" in out.stdout
        job_id = out.stdout.split()[0]
        w = worker(name="late", base=down)
        wait_status(connect(down), job_id, {"finished"}, timeout=120)
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    finally:
        server.stop()


def test_stop_during_start_up_is_a_clean_requested_stop(env, tmp_path):
    """SIGTERM while the teacher loads (before rq's handlers exist) still exits 0 and takes no job."""
    w = WorkerProcess(env, tmp_path / "early.log").launch()
    try:
        w.wait_event("model_loaded")
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0
    finally:
        w.stop()
