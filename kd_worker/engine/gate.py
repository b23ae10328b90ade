"""The publish gate: is the candidate at least as good as what the domain serves now?

It compares the candidate with the domain's published adapter on this job's held-out data (KL
to the teacher at T=1), with the student base and LoRA shape unchanged. Evaluating the
published adapter borrows the candidate's LoRA layers: its weights are loaded into them and the
candidate's put back afterwards, whatever happens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from jobs import publisher
from kd_worker.engine.checkpoints import load_arrays
from kd_worker.engine.hooks import Hooks, Progress
from kd_worker.engine.objective import Objective
from kd_worker.engine.trainer import adapter_weights, evaluate
from kd_worker.engine.types import Candidate


def publish_gate(candidate: Candidate, adapters_dir: Path, tolerance: float, hooks: Hooks) -> dict[str, Any]:
    """{"decision": "publish" | "reject", "reason", ...}: reject when the candidate's held-out KL
    is worse than the published version's by more than `tolerance` (relative)."""
    domain, val, student = candidate.request.domain, candidate.data.val, candidate.student
    hooks.on_progress(Progress("validate", 0, 1))
    current = publisher.resolve(adapters_dir, domain)
    if current is None:
        return {"decision": "publish", "reason": "first version of the domain"}
    if not val:
        return {"decision": "publish", "reason": "no held-out data to compare on"}
    try:
        manifest = publisher.verify(current.path)
        pub_cfg = manifest["summary"].get("adapter", {})
    except (publisher.PublishError, KeyError) as e:
        return {"decision": "publish", "reason": f"current version unreadable: {e}"}
    if pub_cfg != candidate.identity["adapter"]:
        return {"decision": "publish", "reason": "published adapter has another student or LoRA shape"}
    objective = Objective.from_config(candidate.cfg, candidate.data.plan.student_vocab)
    mine = {k: mx.array(v) for k, v in adapter_weights(student.model).items()}
    student.model.load_weights(list(load_arrays(current.path / publisher.WEIGHTS).items()), strict=False)
    try:
        baseline = evaluate(student, val, objective, candidate.cfg.batch_size, hooks)
    finally:
        student.model.load_weights(list(mine.items()), strict=False)
    cand_kl = candidate.after["kl"]
    regress = cand_kl > baseline["kl"] * (1 + tolerance) + 1e-9
    return {
        "decision": "reject" if regress else "publish",
        "reason": "higher held-out KL than the published version"
        if regress
        else "not worse than the published version",
        "candidate_kl": cand_kl,
        "published_kl": baseline["kl"],
        "published_version": current.number,
    }
