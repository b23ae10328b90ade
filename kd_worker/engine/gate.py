"""The publish gate: is the candidate at least as good as what the domain serves now, on the new
data *and* on what earlier jobs taught?

It compares the candidate with the domain's published adapter (KL to the teacher at T=1, student
base and LoRA shape unchanged) on two sets:
  held-out    this job's held-out split, which the published version never saw;
  regression  the domain's regression set: examples earlier jobs held out (engine.types.Continual),
              which the published version learned from their neighbours. A candidate that
              improves on the new data but got worse here has forgotten: it is rejected too.
Evaluating the published adapter borrows the candidate's LoRA layers: its weights are loaded into
them and the candidate's put back afterwards, whatever happens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from jobs import publisher
from kd_worker.engine.checkpoints import load_arrays
from kd_worker.engine.data import StudentSequence
from kd_worker.engine.hooks import Hooks, Progress
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.objective import Objective
from kd_worker.engine.trainer import adapter_weights, evaluate
from kd_worker.engine.types import Candidate


def comparison(mine: dict[str, float], published: dict[str, float], n: int) -> dict[str, Any]:
    """One set's side-by-side (empty when the set is)."""
    if not n:
        return {}
    return {
        "examples": n,
        "candidate_kl": mine["kl"],
        "published_kl": published["kl"],
        "candidate_ce": mine["ce"],
        "published_ce": published["ce"],
    }


def worse(cmp: dict[str, Any], tolerance: float, slack: float = 0.0) -> bool:
    """The candidate's KL above the published one's by more than `tolerance` (relative) + `slack` (nats/token)."""
    return bool(cmp) and cmp["candidate_kl"] > cmp["published_kl"] * (1 + tolerance) + slack + 1e-9


def evaluate_published(
    student: LoadedModel, version_dir: Path, sets: Sequence[Sequence[StudentSequence]], objective, bs: int, hooks
) -> list[dict[str, float]]:
    """The published adapter's metrics on each set, in the candidate's borrowed LoRA layers."""
    mine = {k: mx.array(v) for k, v in adapter_weights(student.model).items()}
    student.model.load_weights(list(load_arrays(version_dir / publisher.WEIGHTS).items()), strict=False)
    try:
        return [evaluate(student, seqs, objective, bs, hooks) for seqs in sets]
    finally:
        student.model.load_weights(list(mine.items()), strict=False)


def excess(cmp: dict[str, Any], tolerance: float, slack: float = 0.0) -> str:
    c, p = cmp["candidate_kl"], cmp["published_kl"]
    allowed = f"tolerance {tolerance * 100:g}%" + (f" + {slack:g}" if slack else "")
    return f"{c:.4f} vs {p:.4f} (+{(c / p - 1) * 100 if p else float('inf'):.1f}%, {allowed})"


def verdict(
    held_out: dict[str, Any], regression: dict[str, Any], version: int, tolerance: float, slack: float
) -> tuple[str, str]:
    """(decision, reason): forgetting (the regression set) is named first, even when the new data improved."""
    if worse(regression, tolerance, slack):
        better_here = held_out and not worse(held_out, 0.0)
        return "reject", (
            f"forgets earlier jobs: KL on the regression set ({regression['examples']} examples earlier jobs held "
            f"out) {excess(regression, tolerance, slack)} for the published v{version}"
            + (", although better on this job's held-out data" if better_here else "")
        )
    if worse(held_out, tolerance):
        return "reject", f"higher held-out KL than the published v{version}: {excess(held_out, tolerance)}"
    both = " (held-out and regression set)" if regression else ""
    return "publish", f"not worse than the published version{both}"


def publish_gate(
    candidate: Candidate, adapters_dir: Path, tolerance: float, hooks: Hooks, regression_slack: float = 0.0
) -> dict[str, Any]:
    """{"decision": "publish" | "reject", "reason", "held_out": {...}, "regression": {...}, ...}:
    reject when the candidate's KL on this job's held-out split is worse than the published
    version's by more than `tolerance` (relative), or on the regression set by more than
    `tolerance` + `regression_slack` nats per token. The absolute slack is for the regression set:
    a version that learned those facts has a KL near zero there, where a relative bound means
    nothing, and a candidate that learned more has to share its capacity (bench/continual.py)."""
    domain, data, student = candidate.request.domain, candidate.data, candidate.student
    hooks.on_progress(Progress("validate", 0, 1))
    current = publisher.resolve(adapters_dir, domain)
    if current is None:
        return {"decision": "publish", "reason": "first version of the domain"}
    if not data.val and not data.regression:
        return {"decision": "publish", "reason": "no held-out data to compare on"}
    try:
        manifest = publisher.verify(current.path)
        pub_cfg = manifest["summary"].get("adapter", {})
    except (publisher.PublishError, KeyError) as e:
        return {"decision": "publish", "reason": f"current version unreadable: {e}"}
    if pub_cfg != candidate.identity["adapter"]:
        return {"decision": "publish", "reason": "published adapter has another student or LoRA shape"}
    objective = Objective.from_config(candidate.cfg, data.plan.student_vocab)
    bs = candidate.cfg.batch_size
    mine_reg = evaluate(student, data.regression, objective, bs, hooks)
    pub_val, pub_reg = evaluate_published(student, current.path, (data.val, data.regression), objective, bs, hooks)
    held_out = comparison(candidate.after, pub_val, len(data.val))
    regression = comparison(mine_reg, pub_reg, len(data.regression))
    decision, reason = verdict(held_out, regression, current.number, tolerance, regression_slack)
    return {
        "decision": decision,
        "reason": reason,
        "candidate_kl": held_out.get("candidate_kl"),
        "published_kl": held_out.get("published_kl"),
        "published_version": current.number,
        "tolerance": tolerance,
        "regression_slack": regression_slack,
        "held_out": held_out,
        "regression": regression,
    }
