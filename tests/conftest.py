"""Session-wide set-up: a fast BLAS before anything imports mlx.core, the demo models, Redis."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from any test directory

from kd_worker.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # must precede every `import mlx.core` in the test session

import pytest  # noqa: E402

from helpers import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    """The tiny demo models, built once per session (about 2 s)."""
    from kd_worker.tinymodels import build_demo_models

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
