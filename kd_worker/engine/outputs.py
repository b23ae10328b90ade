"""The documents of a published version and handing it to `jobs.publisher` (the only writer of
adapters_kd/): mlx-lm's adapter layout (adapters.safetensors + adapter_config.json, which
`mlx_lm.load(..., adapter_path=...)` and `mlx_lm fuse` read unchanged) plus the KD
configuration, kd_metrics.json, the run's checkpoints and the summary entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import structlog

from jobs import publisher
from jobs.config import KDConfig
from kd_worker.engine import xtok
from kd_worker.engine.checkpoints import save_adapter_file
from kd_worker.engine.hooks import Hooks, Progress
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.trainer import adapter_weights, lora_layer_count
from kd_worker.engine.types import Candidate
from kd_worker.engine.vocab import VocabPlan

log = structlog.get_logger(__name__)


def identity_doc(teacher: LoadedModel, student: LoadedModel, cfg: KDConfig, plan: VocabPlan) -> dict[str, Any]:
    return {
        "teacher": {"path": str(teacher.path), "identity": teacher.identity},
        "student": {"path": str(student.path), "identity": student.identity},
        "vocabulary": {
            "mode": plan.mode,
            "n_vocab": plan.n_vocab,
            "teacher_rows": plan.teacher_rows,
            "student_rows": plan.student_rows,
            "student_tokens": plan.student_tokens,
        },
        "adapter": {
            "student": student.identity,
            "num_layers": lora_layer_count(student.model, cfg),
            "lora_parameters": cfg.lora_parameters(),
        },
    }


def metrics_doc(c: Candidate, gate: dict[str, Any]) -> dict[str, Any]:
    """kd_metrics.json: loss curves, before/after, the gate's decision (held-out and regression set),
    data, timing, targets, the continual loop's init and replay."""
    data, result = c.data, c.result
    seqs = data.train + data.val
    n_target_tokens = sum(len(t) for t in data.targets)
    return {
        "train": result.history["train"],
        "val": result.history["val"],
        "before": c.before,
        "after": c.after,
        "gate": gate,
        "selected": c.selected,
        **({"on_policy": on_policy_doc(c.cfg, result.history["train"])} if c.cfg.on_policy > 0 else {}),
        "data": {
            "examples": c.n_examples,
            "train": len(data.train),
            "val": len(data.val),
            "response_tokens": int(sum(len(s.tokens) - s.resp_start for s in seqs)),
        },
        "timing": {
            "teacher_s": data.teacher_s,
            "train_s": result.seconds,
            "resumed_from": result.resumed_from,
            "train_tokens_per_s": result.tokens / result.seconds if result.seconds else None,
            "peak_memory_bytes": mx.get_peak_memory(),
        },
        "targets": {
            "tokens": n_target_tokens,
            "bytes_per_token": sum(t.nbytes for t in data.targets) / max(n_target_tokens, 1),
        },
        "vocabulary": {"mode": data.plan.mode, "notes": list(data.plan.notes)},
        "continual": continual_doc(c),
        "samples": c.samples,
        **({"xtok": xtok.coverage_report(seqs)} if data.plan.mode == "cross" else {}),
    }


def on_policy_doc(cfg: KDConfig, train: list[dict[str, float]]) -> dict[str, Any]:
    """The on-policy share and cost of a run (per-step numbers are in the "train" rows)."""
    on = [r for r in train if r.get("on_policy")]
    kls = [r["onpolicy_kl"] for r in on if "onpolicy_kl" in r]
    return {
        "share": cfg.on_policy,
        "steps": len(on),
        "rollouts": sum(int(r.get("rollout", 0)) for r in on),
        "rollout_s": sum(r.get("rollout_s", 0.0) for r in on),
        "score_s": sum(r.get("score_s", 0.0) for r in on),
        "kl_first": kls[0] if kls else None,
        "kl_last": kls[-1] if kls else None,
    }


def continual_doc(c: Candidate) -> dict[str, Any]:
    """Where the job started from and what of the domain's history it saw."""
    return {
        "init": c.init,
        "replay": {
            "share": c.cfg.replay if c.data.replay else 0.0,
            "examples": len(c.data.replay),
            "rows": int(sum(row.get("replay_rows", 0) for row in c.result.history["train"])),
            "keys": c.data.replay_keys,  # which corpus examples (kd-client data list) trained this version too
        },
        "regression_examples": len(c.data.regression),
    }


def config_doc(c: Candidate) -> dict[str, Any]:
    """adapter_config.json: mlx-lm's fields, plus the job's KD configuration and identities."""
    return {
        "fine_tune_type": "lora",
        **{k: c.identity["adapter"][k] for k in ("num_layers", "lora_parameters")},
        "kd": {"config": c.cfg.model_dump(mode="json"), **c.identity},
    }


def write_version(stage: Path, c: Candidate, metrics: dict[str, Any]) -> None:
    """Files of one version, mlx-lm's adapter layout (+ KD config, metrics, checkpoints)."""
    config = config_doc(c)
    save_adapter_file(stage / publisher.WEIGHTS, adapter_weights(c.student.model))
    publisher.write_json_atomic(stage / publisher.ADAPTER_CONFIG, config)
    publisher.write_json_atomic(stage / publisher.METRICS, metrics)
    for step in c.checkpoints.steps():
        d = stage / f"checkpoint_{step}"
        d.mkdir()
        save_adapter_file(d / publisher.WEIGHTS, c.checkpoints.adapter(step))
        publisher.write_json_atomic(d / publisher.ADAPTER_CONFIG, {**config, "checkpoint_step": step})


def publish(
    c: Candidate, adapters_dir: Path, gate: dict[str, Any], keep: int, hooks: Hooks, first_number: int = 1
) -> publisher.Version:
    """Write the candidate as the domain's next version (numbered at least `first_number`) and make it current."""
    req = c.request
    metrics = metrics_doc(c, gate)
    entry = {
        "job_id": req.job_id,
        "run_id": req.run_id,
        **c.identity,
        "metrics": {"before": c.before, "after": c.after},
        "data": metrics["data"],
        "gate": gate,
        "init": c.init,
        "forced": req.force_publish and gate["decision"] == "reject",
    }
    hooks.on_progress(Progress("publish", 0, 1))
    version = publisher.publish(
        adapters_dir, req.domain, lambda stage: write_version(stage, c, metrics), entry, keep, first_number
    )
    hooks.on_progress(Progress("publish", 1, 1))
    log.info("distillation_published", domain=req.domain, version=version.number, path=str(version.path))
    return version
