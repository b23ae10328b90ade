"""The output layer (seed layer 6): the publish gate, the files of one version (mlx-lm's adapter
layout + KD configuration, metrics, checkpoints) and the summary entry. Writes go through
jobs.publisher, the only writer of adapters_kd/."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from jobs import publisher
from jobs.config import KDConfig
from kd_worker.engine.checkpoints import DirCheckpointStore, save_adapter_file
from kd_worker.engine.data import Sequence_
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.trainer import adapter_weights, evaluate, lora_layer_count
from kd_worker.engine.vocab import VocabPlan
from kd_worker.settings import WorkerSettings

if TYPE_CHECKING:
    from kd_worker.engine.types import DistillRequest, Prepared


def publish_gate(
    student: LoadedModel,
    val: Sequence[Sequence_],
    cfg: KDConfig,
    n_vocab: int,
    settings: WorkerSettings,
    domain: str,
    candidate: dict[str, float],
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Compare the candidate with the published adapter of the domain on this job's held-out data."""
    current = publisher.resolve(settings.adapters_dir, domain)
    if current is None:
        return {"decision": "publish", "reason": "first version of the domain"}
    if not val:
        return {"decision": "publish", "reason": "no held-out data to compare on"}
    try:
        manifest = publisher.verify(current.path)
        pub_cfg = manifest["summary"].get("adapter", {})
    except (publisher.PublishError, KeyError) as e:
        return {"decision": "publish", "reason": f"current version unreadable: {e}"}
    if pub_cfg != identity["adapter"]:
        return {"decision": "publish", "reason": "published adapter has another student or LoRA shape"}
    mine = {k: mx.array(v) for k, v in adapter_weights(student.model).items()}
    student.model.load_weights(list(mx.load(str(current.path / publisher.WEIGHTS)).items()), strict=False)
    baseline = evaluate(student, val, cfg, n_vocab)
    student.model.load_weights(list(mine.items()), strict=False)
    regress = candidate["kl"] > baseline["kl"] * (1 + settings.gate_tolerance) + 1e-9
    return {
        "decision": "reject" if regress else "publish",
        "reason": "higher held-out KL than the published version"
        if regress
        else "not worse than the published version",
        "candidate_kl": candidate["kl"],
        "published_kl": baseline["kl"],
        "published_version": current.number,
    }


def write_version(
    stage: Path,
    student: LoadedModel,
    cfg: KDConfig,
    store: DirCheckpointStore,
    config_doc: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Files of one version, mlx-lm's adapter layout (+ KD config, metrics, checkpoints)."""
    save_adapter_file(stage / publisher.WEIGHTS, adapter_weights(student.model))
    publisher.write_json_atomic(stage / publisher.ADAPTER_CONFIG, config_doc)
    publisher.write_json_atomic(stage / publisher.METRICS, metrics)
    for step in store.steps():
        d = stage / f"checkpoint_{step}"
        d.mkdir()
        save_adapter_file(d / publisher.WEIGHTS, store.adapter(step))
        publisher.write_json_atomic(d / publisher.ADAPTER_CONFIG, {**config_doc, "checkpoint_step": step})


def own_version(root: Path, req: DistillRequest) -> dict[str, Any] | None:
    """This run's outcome if a version it published went live, i.e. its job failed after the
    pointer swap (Redis lost at the ordering guard's exit, a kill before outcome.json)."""
    current = publisher.resolve(root, req.domain)
    for v in reversed(publisher.versions(root, req.domain)):
        if current is None or v.number > current.number:
            continue  # staged and renamed but never made current: publish again
        try:
            entry = json.loads((v.path / publisher.MANIFEST).read_text())["summary"]
        except (OSError, ValueError, KeyError):
            continue
        if entry.get("run_id") == req.run_id:
            metrics = entry.get("metrics", {})
            return {
                "domain": req.domain,
                "run_id": req.run_id,
                "gate": entry.get("gate", {}),
                "before": metrics.get("before", {}),
                "after": metrics.get("after", {}),
                "published": True,
                "version": v.number,
                "adapter_path": str(v.path),
                "seconds": 0.0,
            }
    return None


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


def metrics_doc(result, gate: dict[str, Any], n_examples: int, data: Prepared) -> dict[str, Any]:
    seqs = data.train + data.val
    n_target_tokens = sum(len(t) for t in data.targets)
    return {
        "train": result.history["train"],
        "val": result.history["val"],
        "before": result.history["val"][0],
        "after": result.history["val"][-1],
        "gate": gate,
        "data": {
            "examples": n_examples,
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
        **({"xtok": _xtok_report(seqs)} if data.plan.mode == "cross" else {}),
    }


def _xtok_report(seqs: Sequence[Sequence_]) -> dict[str, Any]:
    from kd_worker.engine import xtok

    return xtok.coverage_report(seqs)
