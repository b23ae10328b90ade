from __future__ import annotations

import json

import pytest

from helpers import kd_env

FAST = {"iterations": 20, "gen_max_tokens": 24, "val_every": 10, "save_every": 10, "batch_size": 4}


@pytest.fixture
def env(tmp_path, models_root, redis_url) -> dict[str, str]:
    """Environment for worker and client processes: real Redis, tiny models, small jobs."""
    return kd_env(
        KD_REDIS_URL=redis_url,
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
        KD_MODELS_ROOT=str(models_root),
        KD_WORK_DIR=str(tmp_path / "work"),
        KD_ADAPTERS_DIR=str(tmp_path / "adapters_kd"),
        KD_SPOOL_DIR=str(tmp_path / "spool"),
        KD_KD_DEFAULTS=json.dumps(FAST),
        KD_HEARTBEAT_INTERVAL="1",
        KD_WORKER_NAME=f"test-{tmp_path.name}",
    )
