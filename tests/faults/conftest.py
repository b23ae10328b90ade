from __future__ import annotations

import pytest


@pytest.fixture
def heartbeat_interval() -> str:
    """A heartbeat every 0.5 s makes a killed worker's health key lapse within 2 s (restarts)."""
    return "0.5"
