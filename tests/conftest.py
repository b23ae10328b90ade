"""Session-wide set-up: a fast BLAS before anything imports mlx.core, the demo models, Redis."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from any test directory

from kd_worker.ops.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # must precede every `import mlx.core` in the test session

import pytest  # noqa: E402
from helpers import RedisServer, WorkerProcess, worker_env  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    """The tiny demo models, built once per session (about 2 s)."""
    from kd_worker.fixtures.tinymodels import build_demo_models

    root = tmp_path_factory.mktemp("models")
    build_demo_models(root)
    return root


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session; tests get it flushed (see `redis_url`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def heartbeat_interval() -> str:
    """Seconds between worker heartbeats (health-key TTL is 3x); the fault suite shortens it."""
    return "1"


@pytest.fixture
def env(tmp_path, models_root, redis_url, heartbeat_interval) -> dict[str, str]:
    """Environment for worker and client processes: real Redis, tiny models, small jobs."""
    return worker_env(tmp_path, models_root, redis_url, heartbeat_interval)


@pytest.fixture
def worker(env, tmp_path):
    """start(name=None, base=None, **KD_VARS) -> a running `kd-worker run`; all killed at teardown."""
    procs: list[WorkerProcess] = []

    def start(name: str | None = None, base: dict[str, str] | None = None, **extra_env: str) -> WorkerProcess:
        e = dict(base or env, **extra_env)
        if name:
            e["KD_WORKER_NAME"] = name
        w = WorkerProcess(e, tmp_path / f"worker-{len(procs)}.log").start()
        procs.append(w)
        return w

    yield start
    for w in procs:
        w.stop()
