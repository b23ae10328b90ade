"""Warm start (KDConfig.init="current"): the freshly attached LoRA layers take the weights of the
domain's published adapter, so a job continues the neuron instead of starting it over.

Only a compatible adapter is loaded: the same student identity and LoRA shape (the manifest's
summary "adapter" block, which the publish gate compares too) and the same weight names and
shapes. Anything else falls back to the base with a logged reason: a warm start is an
optimisation, never a reason to fail a job. A resumed run's checkpoint overrides these weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog

from jobs import publisher
from jobs.errors import PublishError
from kd_worker.engine.checkpoints import load_arrays
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.trainer import adapter_weights

log = structlog.get_logger(__name__)


def shape_difference(published: dict[str, Any], mine: dict[str, Any]) -> str:
    """Which fields of two summary "adapter" blocks differ, e.g. "lora_parameters.rank 8 != 16"."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(published), flat(mine)
    diffs = [f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs)


def compatible_weights(
    version_dir: Path, adapter: dict[str, Any], mine: dict[str, mx.array]
) -> tuple[dict[str, mx.array] | None, str]:
    """(weights, "") when the published adapter fits this job's LoRA layers, else (None, reason)."""
    try:
        manifest = publisher.verify(version_dir)
        published = manifest["summary"]["adapter"]
    except (PublishError, KeyError, OSError, ValueError) as e:
        return None, f"the published version {version_dir} is unreadable ({e})"
    if published != adapter:
        return None, f"the published adapter has another student or LoRA shape: {shape_difference(published, adapter)}"
    try:
        weights = load_arrays(version_dir / publisher.WEIGHTS)
    except (OSError, ValueError, RuntimeError) as e:
        return None, f"cannot read {version_dir / publisher.WEIGHTS} ({e})"
    odd = sorted(k for k in set(weights) | set(mine) if k not in weights or k not in mine)
    odd += sorted(k for k in set(weights) & set(mine) if weights[k].shape != mine[k].shape)
    if odd:
        return None, f"the published weights do not match this job's LoRA layers ({', '.join(odd[:3])} ...)"
    return {k: v.astype(mine[k].dtype) for k, v in weights.items()}, ""


def warm_start(student: LoadedModel, adapter: dict[str, Any], init: str, version_dir: Path | None) -> dict[str, Any]:
    """Load the published adapter into the attached LoRA layers when `init` is "current" and it is
    compatible; returns kd_metrics.json's "init" block: requested, used, version or reason."""
    if init == "base":
        return {"requested": "base", "used": "base"}
    weights, reason = None, "the domain has no published version"
    if version_dir is not None:
        weights, reason = compatible_weights(version_dir, adapter, adapter_weights(student.model))
    if version_dir is None or weights is None:
        log.warning("warm_start_fallback", requested=init, used="base", reason=reason)
        return {"requested": init, "used": "base", "reason": reason}
    student.model.load_weights(list(weights.items()), strict=False)
    version = int(version_dir.name) if version_dir.name.isdigit() else None
    log.info("warm_start", version=version, path=str(version_dir))
    return {"requested": init, "used": "current", "version": version, "path": str(version_dir)}
