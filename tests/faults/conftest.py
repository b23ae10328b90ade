from __future__ import annotations

import pytest
from helpers import SHIPPED_REDIS_CONF, RedisServer


@pytest.fixture
def heartbeat_interval() -> str:
    """A heartbeat every 0.5 s makes a killed worker's health key lapse within 2 s (restarts)."""
    return "0.5"


@pytest.fixture
def shipped_redis(tmp_path):
    """A redis-server of its own with the shipped launchd/redis.conf (AOF everysec, noeviction, loopback)."""
    server = RedisServer(tmp_path / "redis", config=SHIPPED_REDIS_CONF).start()
    yield server
    server.stop()
