"""ClientSettings: what kd-client and EGO's API read from KD_* variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from jobs.settings import QueueSettings


def _default_spool() -> Path:
    return Path.home() / ".local" / "share" / "kd-daemon" / "spool"


class ClientSettings(QueueSettings):
    adapters_dir: Path = Path("adapters_kd")  # where `summary`, `rollback` and `follow` look
    spool_dir: Path = Field(default_factory=_default_spool)  # durable outbox when Redis is away
    connect_timeout: float = 1.0  # a producer never blocks long on a missing Redis
    socket_timeout: float = 5.0
    accumulate_threshold: int = Field(default=50, ge=1)  # corrections per automatic job
    accumulate_max_age_s: float = Field(default=3600.0, gt=0)  # ... or this old, whichever first
    retry_backoff_s: float = 30.0  # after a failed delivery, spool without trying Redis for this long
