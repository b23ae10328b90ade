"""`kd-worker run` start-up (issues 13 and 15): a stop requested while the worker waits for Redis or for
a worker name still in use is honoured at once; a configuration error (bad password, bad setting,
worker-name conflict) ends the process with exit 78 before any model loads (a 6 GB teacher on the
target Mac: a misconfigured agent must not reload it every ThrottleInterval).

"Before any model loads" is read from the worker's own log: no `model_loaded` event."""

from __future__ import annotations

import signal
import subprocess

import pytest
from faultkit import Unharmed
from helpers import RedisServer, WorkerProcess, free_port, venv_bin


def launched(env: dict[str, str], tmp_path, name: str, **extra: str) -> WorkerProcess:
    return WorkerProcess(dict(env, **extra), tmp_path / f"{name}.log").launch()


def stopped_promptly(w: WorkerProcess) -> int:
    w.signal(signal.SIGTERM)
    try:
        return w.wait(timeout=10)
    except subprocess.TimeoutExpired:
        w.stop()
        pytest.fail("SIGTERM during start-up was ignored:\n" + w.log_path.read_text()[-3000:])


def test_sigterm_while_waiting_for_redis_stops_at_once(env, tmp_path):
    w = launched(env, tmp_path, "no-redis", KD_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    w.wait_event("redis_unavailable", timeout=120)
    assert stopped_promptly(w) == 0
    assert not w.events("model_loaded")  # Redis first, then the teacher


def test_sigterm_while_the_worker_name_is_in_use_stops_at_once(env, worker, tmp_path):
    first = worker(name="kd-twin")
    guard = Unharmed(env, first, "memory")
    # a long health TTL: the second worker would wait ~32 s for the name to lapse
    w = launched(env, tmp_path, "twin", KD_WORKER_NAME="kd-twin", KD_HEARTBEAT_INTERVAL="10")
    w.wait_event("worker_name_in_use", timeout=120)
    assert stopped_promptly(w) == 0
    assert not w.events("model_loaded")
    guard.check()


def config_error(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    cmd = [venv_bin("kd-worker"), "run"]
    return subprocess.run(cmd, env=dict(env, **extra), capture_output=True, text=True, timeout=120)


def test_configuration_errors_exit_78_before_any_model_loads(env, worker, tmp_path):
    server = RedisServer(tmp_path / "locked-redis", password="kd-s3cret").start()
    first = worker(name="kd-taken")
    guard = Unharmed(env, first, "memory")
    try:
        cases = {
            "wrong password": {"KD_REDIS_URL": server.url.replace("kd-s3cret", "guess")},
            "no password": {"KD_REDIS_URL": f"redis://127.0.0.1:{server.port}/0"},
            "bad setting": {"KD_HEARTBEAT_INTERVAL": "often"},
            "name in use": {"KD_WORKER_NAME": "kd-taken"},
        }
        for case, extra in cases.items():
            out = config_error(env, **extra)
            assert out.returncode == 78, (case, out.stderr[-2000:])
            assert '"model_loaded"' not in out.stdout + out.stderr, case
            assert "KD_" in out.stderr and "guess" not in out.stdout + out.stderr, (case, out.stderr[-2000:])
        guard.check()
    finally:
        server.stop()
