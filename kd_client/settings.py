"""ClientSettings: what kd-client and EGO's API read from KD_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from jobs.settings import QueueSettings


def _default_spool() -> Path:
    return Path.home() / ".local" / "share" / "kd-daemon" / "spool"


class ClientSettings(QueueSettings):
    adapters_dir: Path = Path("adapters_kd")  # where `summary`, `rollback`, `follow`, `serve` and `sync` look
    # redis: `serve` and `follow` mirror the versions published in Redis into adapters_dir first (kd_client/mirror.py)
    adapters_source: Literal["local", "redis"] = "local"
    sync_poll_s: float = Field(default=2.0, gt=0)  # a mirror re-reads the pointers this often besides pub/sub wake-ups
    spool_dir: Path = Field(default_factory=_default_spool)  # durable outbox when Redis is away
    connect_timeout: float = 1.0  # a producer never blocks long on a missing Redis
    socket_timeout: float = 5.0
    accumulate_threshold: int = Field(default=50, ge=1)  # corrections per automatic job
    accumulate_max_age_s: float = Field(default=3600.0, gt=0)  # ... or this old, whichever first
    retry_backoff_s: float = 30.0  # after a failed delivery, spool without trying Redis for this long

    # `kd-client serve`: the OpenAI-compatible endpoint of the neurons (kd_client/serve.py)
    serve_api_key: SecretStr | None = None  # Bearer token; required when binding beyond loopback
    serve_max_body_bytes: int = Field(default=1 << 20, ge=1024)  # a larger request body is refused (413)
    serve_max_tokens: int = Field(default=2048, ge=1)  # the most max_tokens a request may ask for
    serve_default_max_tokens: int = Field(default=512, ge=1)  # when a request names none
    serve_max_prompt_tokens: int = Field(default=8192, ge=1)
    serve_max_queued: int = Field(default=64, ge=1)  # waiting requests beyond this get 503
    serve_prompt_cache_entries: int = Field(default=8, ge=0)  # KV caches kept for prefix reuse (0: none)
    serve_max_skips: int = Field(
        default=4, ge=0
    )  # times the oldest request may be passed over for the installed domain
    serve_watch_debounce_ms: int = Field(default=200, ge=1)  # how long a burst of publishes is gathered
    serve_force_polling: bool = False  # poll adapters_kd/ (network filesystems)

    # `kd-client dashboard`: rollback and cancel need this token (typed into the form); unset, they are disabled
    dashboard_token: SecretStr | None = None

    @field_validator("dashboard_token", mode="before")
    @classmethod
    def _dashboard_token(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None  # set but empty: the actions stay disabled
        raw = v.get_secret_value() if isinstance(v, SecretStr) else str(v)
        if len(raw) < 12:
            raise ValueError(
                "KD_DASHBOARD_TOKEN is shorter than 12 characters; use a random one, e.g. "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        return v
