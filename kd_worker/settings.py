"""WorkerSettings: the one settings object of the worker, read from KD_* variables once in main()."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.errors import ConfigError
from jobs.settings import QueueSettings
from jobs.settings import load_settings as load_queue_settings

# The shipped SIGTERM -> SIGKILL time of the service (launchd ExitTimeOut, systemd TimeoutStopSec), the default
# of KD_SHUTDOWN_GRACE. The one place to change it: the service templates are rendered from the setting.
# Chosen from bench/realsize.py: the worst measured SIGTERM-to-exit of `kd-worker run` was 145 s (a scoring
# batch and a validation batch of a 1.5B teacher / 0.5B student on a loaded 2-core CPU), times 1.25.
SHUTDOWN_GRACE_S = 180


def default_work_dir(home: Path | None = None) -> Path:
    return (home or Path.home()) / ".cache" / "kd-daemon"


class WorkerSettings(QueueSettings):
    """Everything the worker and `kd-worker` commands read from the environment (prefix KD_)."""

    teacher: Path | None = None  # default teacher model directory (HF layout)
    student: Path | None = None  # default student base model directory
    models_root: Path | None = None  # jobs may name a model directory under this root
    adapters_dir: Path = Path("adapters_kd")  # published adapters (the cortex watches this)
    work_dir: Path = Field(default_factory=lambda: default_work_dir())  # target cache, checkpoints, data
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    blas_library: Path | None = None  # explicit BLAS to load on Linux (default: search for OpenBLAS)
    openblas_coretype: str | None = Field(
        default=None, validation_alias=AliasChoices("KD_OPENBLAS_CORETYPE", "OPENBLAS_CORETYPE")
    )
    worker_name: str = Field(default_factory=lambda: f"kd@{socket.gethostname()}")
    heartbeat_interval: float = 5.0  # seconds between heartbeats (health key, and the running job's registry entry)
    # Seconds launchd/systemd wait after SIGTERM before SIGKILL (ExitTimeOut / TimeoutStopSec):
    # time to checkpoint the running job at its next training step and requeue it.
    shutdown_grace: int = Field(default=SHUTDOWN_GRACE_S, ge=5, le=3600)
    lost_job_grace: float = Field(default=60.0, gt=0)  # a "queued" job in no queue this long is requeued
    kd_defaults: dict[str, Any] = Field(default_factory=dict)  # KDConfig defaults, JSON
    max_examples: int = Field(default=20_000, ge=1)
    # Bytes of MLX memory (resident models included) a job may reach: its plan is checked against it
    # before it starts (engine/memory.py) and MLX's peak between batches and steps; over it the job
    # fails with ResourceLimitExceeded. None: Metal's recommended working set (or RAM) less a margin.
    max_job_memory: int | None = Field(default=None, ge=1)
    cache_student: bool = True  # keep the last student base resident between jobs
    gate_tolerance: float = Field(default=0.01, ge=0.0)  # relative held-out KL increase still published
    # nats per token the regression-set KL may rise on top of gate_tolerance (bench/continual.py)
    gate_regression_slack: float = Field(default=0.02, ge=0.0)

    @field_validator("teacher", "student", "models_root", "adapters_dir", "work_dir", "blas_library")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("worker_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or len(v) > 100 or any(c.isspace() for c in v):
            raise ValueError(f"KD_WORKER_NAME={v!r}: use 1-100 characters without spaces")
        return v

    @property
    def publish_root(self) -> Path:
        """Where this worker publishes: KD_ADAPTERS_DIR, or with KD_PUBLISH_TO=redis a copy of its own
        (the gate's reference and the source of the push) that no consumer reads."""
        return self.work_dir / "published" if self.publish_to == "redis" else self.adapters_dir


def load_settings(**overrides: Any) -> WorkerSettings:
    """Build WorkerSettings; a bad variable becomes a ConfigError that names what to set."""
    return load_queue_settings(WorkerSettings, **overrides)


class _WorkDirOnly(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KD_", extra="ignore")
    work_dir: Path = Field(default_factory=lambda: default_work_dir())


def work_dir_alone() -> Path:
    """KD_WORK_DIR read on its own: where `kd-worker run` records why it stopped when another setting is
    invalid (so WorkerSettings cannot be built)."""
    try:
        return _WorkDirOnly().work_dir.expanduser()
    except ValidationError:
        return default_work_dir()


def require_model_dir(path: Path | None, var: str) -> Path:
    """A model directory must exist and hold config.json; otherwise say which variable to set."""
    if path is None:
        raise ConfigError(f"{var} is not set: point it at a model directory (config.json, *.safetensors, tokenizer)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{var}={path} is not a model directory (no config.json there)")
    return path
