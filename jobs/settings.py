"""Settings shared by every process that talks to the queue (worker, kd-client, EGO's API)."""

from __future__ import annotations

from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.errors import ConfigError


class QueueSettings(BaseSettings):
    """Environment variables with the prefix KD_ (e.g. KD_REDIS_URL)."""

    model_config = SettingsConfigDict(env_prefix="KD_", extra="ignore", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = "kd"
    job_timeout: int = 6 * 3600  # seconds one job may run (rq's default of 180 s would kill training)
    result_ttl: int = 14 * 24 * 3600  # finished jobs stay visible for two weeks
    failure_ttl: int = 30 * 24 * 3600
    max_attempts: int = 3  # runs of a job that keeps crashing its worker before it is failed
    max_data_bytes: int = 64 * 1024 * 1024
    blob_ttl: int = 30 * 24 * 3600
    # The per-domain corpus (kd_client.corpus): what a domain may hold, and its regression set's size.
    corpus_max_examples: int = Field(default=20_000, ge=1)
    corpus_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    regression_max_examples: int = Field(default=256, ge=0)
    # Published adapters (jobs/publisher.py; kd_client/mirror.py for Redis). The worker publishes into its
    # KD_ADAPTERS_DIR (local), into Redis for consumers on other machines (redis: its own copy then lives in
    # KD_WORK_DIR/published), or both; kd-client rollback moves the Redis pointer unless this is local.
    publish_to: Literal["local", "redis", "both"] = "local"
    keep_versions: int = Field(default=5, ge=1)  # published versions kept per domain (on disk and in Redis)
    max_adapter_bytes: int = Field(default=1 << 30, ge=1)  # one version's files, all together (Redis transfers)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"KD_REDIS_URL={v!r} is not a Redis URL; set e.g. redis://127.0.0.1:6379/0, "
                "redis://:PASSWORD@host:6379/0 or unix:///path/to/redis.sock"
            )
        if parsed.scheme != "unix" and not parsed.hostname:
            raise ValueError(f"KD_REDIS_URL={v!r} has no host; set e.g. redis://127.0.0.1:6379/0")
        return v

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"KD_QUEUE={v!r}: use letters, digits, '-', '_' or '.'")
        return v


S = TypeVar("S", bound=QueueSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build a settings class from the environment; a bad variable is a ConfigError naming it."""
    try:
        return cls(**overrides)
    except ValidationError as e:
        lines = [f"KD_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid settings: " + "; ".join(lines)) from e
