"""On-policy distillation (GKD, Agarwal et al., ICLR 2024): a share of the training steps learn from
the student's *own* samples, scored token by token by the resident teacher, so the student learns
to recover from its own mistakes (exposure bias) instead of only imitating the teacher's text.

`OnPolicyBatches` is a batch source (engine.batches) composed with the offline one:
- step s is on-policy iff floor((s+1) * share) > floor(s * share): an exact, seed-free schedule
  (share 0.5 alternates, 1.0 is every step, any window of n steps holds floor(n * share) of them);
  no draw whose luck skews a short run's share;
- a rollout refreshes at the first on-policy step of each window of `rollout_every` steps:
  `rollout_batch` prompts drawn by rng(seed, step), sampled by the student with its current LoRA in
  eval mode (dropout off) through mlx-lm's batch generation, then teacher-forced through the
  teacher by `teacher.score`, the code that scores offline targets (never cached: the responses
  depend on the weights, which no cache key holds);
- each on-policy step trains `batch_size` sequences of the buffer drawn by rng(seed, step), on
  the on-policy objective: no CE (alpha 1: CE toward the student's own sampled tokens would
  reinforce its mistakes) and forward KL by default. GKD and tinker use reverse KL there; on
  bench.quality's sort task (3 seeds, 300 steps) forward KL ended with a 31% lower KL on the
  student's own samples than reverse KL (0.062 vs 0.090), and it takes the fused loss path (an
  update 1.6x cheaper at V=151,936); `on_policy_divergence=reverse_kl` keeps GKD's choice.

Exact resume: the sampling is seeded from (seed, step), and the buffer in use is saved with every
checkpoint (`state`/`load_state`, the trainer's StatefulBatchSource pair).

Cross-tokenizer pairs are refused (`check_pair`): the alignment (engine.xtok) carries *teacher*
text onto student tokens; the student's samples would have to be decoded and re-tokenized on the
teacher's side, and a sampled token sequence is often not the canonical tokenization of its own
text, so the trained sequence would not be the student's sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from jobs.config import KDConfig
from jobs.errors import ConfigError
from kd_worker.engine import losses
from kd_worker.engine.batches import BatchSource
from kd_worker.engine.data import FIELDS, Batch, SoftTargets, StudentSequence, collate
from kd_worker.engine.hooks import Hooks, check_stop
from kd_worker.engine.models import LoadedModel, head_logits, hidden_at
from kd_worker.engine.objective import Objective, to_mx_targets
from kd_worker.engine.teacher import SCORE_TOKENS_PER_BATCH, generate, make_sampler, score
from kd_worker.engine.trainer import scalar, step_seed
from kd_worker.engine.vocab import VocabPlan

PICK, DRAW = 1, 2  # rng streams: which prompts a rollout samples, which sequences a step trains


def is_on_policy(step: int, share: float) -> bool:
    """Step `step` (0-based) trains on the student's samples."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def rollout_share(step: int, share: float) -> float:
    """The share of steps 0..step that were on-policy."""
    return math.floor((step + 1) * share) / (step + 1)


def rollout_seed(seed: int, step: int) -> int:
    return (seed * 1_000_033 + step * 7 + 3) % (2**31)


def check_pair(plan: VocabPlan, cfg: KDConfig) -> None:
    """Refuse on-policy distillation where the pair's tokenizers differ (see the module note)."""
    if cfg.on_policy > 0 and plan.mode == "cross":
        raise ConfigError(
            f"on_policy={cfg.on_policy} needs a teacher and student with one vocabulary; these tokenizers "
            "differ (cross-tokenizer), and the student's sampled tokens cannot be carried to teacher tokens "
            "exactly; use on_policy=0 (off-policy KD) for this pair, or a student of the teacher's family"
        )


@dataclass(frozen=True)
class RolloutSettings:
    share: float  # GKD's lambda
    every: int  # steps per rollout window
    prompts: int  # prompts per rollout
    max_tokens: int
    temperature: float
    batch_size: int  # sequences per on-policy step
    max_seq_length: int
    seed: int
    top_k: int | None  # of the teacher's targets (None: full vocabulary)
    score_temperature: float  # the job's T (the targets' lse_t)
    n_vocab: int  # shared vocabulary: only these ids are sampled

    @classmethod
    def from_config(cls, cfg: KDConfig, n_vocab: int) -> RolloutSettings:
        return cls(
            share=cfg.on_policy,
            every=cfg.rollout_every,
            prompts=cfg.rollout_batch or cfg.batch_size,
            max_tokens=cfg.rollout_max_tokens or cfg.gen_max_tokens,
            temperature=cfg.rollout_temperature,
            batch_size=cfg.batch_size,
            max_seq_length=cfg.max_seq_length,
            seed=cfg.seed,
            top_k=None if cfg.top_k == "full" else cfg.top_k,
            score_temperature=cfg.temperature,
            n_vocab=n_vocab,
        )


def on_policy_objective(cfg: KDConfig, n_vocab: int) -> Objective:
    return Objective(
        n_vocab, cfg.temperature, cfg.on_policy_alpha, cfg.on_policy_divergence, cfg.jsd_beta, cfg.xtok_uld_weight
    )


def score_rollouts(
    teacher: LoadedModel, pairs: Sequence[tuple[list[int], list[int]]], s: RolloutSettings
) -> list[SoftTargets]:
    """Teacher-forced targets for (teacher prompt, student response) pairs, in token-budgeted batches."""
    out: list[SoftTargets] = []
    batch: list[tuple[list[int], list[int]]] = []
    tokens = 0
    for i, (p, r) in enumerate(pairs):
        batch.append((p, r))
        tokens += len(p) + len(r)
        if tokens >= SCORE_TOKENS_PER_BATCH or i == len(pairs) - 1:
            out += score(teacher, batch, s.n_vocab, s.top_k, s.score_temperature)
            batch, tokens = [], 0
    return out


def student_kl(student: LoadedModel, b: Batch, n_vocab: int) -> float:
    """KL(teacher || student) at T=1 per token (top-k + tail buckets) on a batch, dropout off."""
    was_training = student.model.training
    student.model.eval()
    try:
        h = hidden_at(student, mx.array(b.inputs), mx.array(b.positions))
        t = to_mx_targets(b)
        kl, _ = losses.agreement_sums(head_logits(student, h, n_vocab), t)
        n = t.kd_mask.sum()
        mx.eval(kl, n)
        return scalar(kl) / max(scalar(n), 1.0)
    finally:
        if was_training:
            student.model.train()


class OnPolicyBatches:
    """Offline batches with a share of on-policy ones (student rollouts scored by the teacher)."""

    def __init__(
        self,
        offline: BatchSource,
        student: LoadedModel,
        teacher: LoadedModel,
        prompts: Sequence[tuple[list[int], list[int]]],  # per training example: (student ids, teacher ids)
        settings: RolloutSettings,
        objective: Objective,
        hooks: Hooks,
    ):
        if not prompts:
            raise ConfigError("on_policy > 0 needs training prompts to sample from; the job has none")
        self.offline, self.student, self.teacher = offline, student, teacher
        self.prompts, self.s, self.objective, self.hooks = list(prompts), settings, objective, hooks
        self.window, self.made_at = -1, -1
        self.buffer: list[StudentSequence] = []

    def batch(self, step: int, model: nn.Module | None = None) -> Batch:
        share = {"rollout_share": rollout_share(step, self.s.share)}
        if not is_on_policy(step, self.s.share):
            b = self.offline.batch(step, model)  # type: ignore[arg-type]  # offline sources ignore the model
            b.info = {**b.info, "on_policy": 0.0, **share}
            return b
        timing = {"rollout": 0.0, "rollout_s": 0.0, "score_s": 0.0}
        if step // self.s.every != self.window:
            timing = self.refresh(step)
        rng = np.random.default_rng([self.s.seed, step, DRAW])
        idx = np.sort(rng.choice(len(self.buffer), size=min(self.s.batch_size, len(self.buffer)), replace=False))
        b = collate([self.buffer[i] for i in idx])
        b.objective = self.objective
        b.info = {"on_policy": 1.0, **share, "onpolicy_kl": student_kl(self.student, b, self.s.n_vocab), **timing}
        return b

    def refresh(self, step: int) -> dict[str, float]:
        """A fresh rollout buffer from the current weights: sample, then score by the teacher."""
        s, model = self.s, self.student.model
        rng = np.random.default_rng([s.seed, step, PICK])
        chosen = rng.choice(len(self.prompts), size=min(s.prompts, len(self.prompts)), replace=False)
        student_prompts = [self.prompts[i][0] for i in chosen]
        budgets = [max(1, min(s.max_tokens, s.max_seq_length - len(p))) for p in student_prompts]
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()  # dropout off while sampling
        try:
            mx.random.seed(rollout_seed(s.seed, step))
            sampler = make_sampler(s.temperature, 0, 1.0, s.n_vocab)
            responses = generate(
                self.student, student_prompts, budgets, sampler, len(chosen), self.stop_check("during a rollout")
            )
        finally:
            mx.random.seed(step_seed(s.seed, step))  # the step's random state (LoRA dropout), as the loop seeds it
            if was_training:
                model.train()
        responses = [r if r else [self.student.eos_id] for r in responses]
        t1 = time.perf_counter()
        self.stop_check("before scoring a rollout")()
        targets = score_rollouts(
            self.teacher, [(self.prompts[i][1], r) for i, r in zip(chosen, responses, strict=True)], s
        )
        self.buffer = [
            StudentSequence(np.asarray(p + r, np.int32), len(p), t)
            for p, r, t in zip(student_prompts, responses, targets, strict=True)
        ]
        self.window, self.made_at = step // s.every, step
        return {"rollout": 1.0, "rollout_s": t1 - t0, "score_s": time.perf_counter() - t1}

    def stop_check(self, where: str):
        return lambda: check_stop(self.hooks, where, "the job resumes from its last checkpoint")

    # --- StatefulBatchSource: the buffer in use travels with each checkpoint ----------------------
    def state(self) -> dict[str, np.ndarray]:
        if not self.buffer:
            return {}
        t = [s.targets for s in self.buffer]
        return {
            "window": np.array([self.window, self.made_at], np.int64),
            "lengths": np.array([len(s.tokens) for s in self.buffer], np.int32),
            "resp_start": np.array([s.resp_start for s in self.buffer], np.int32),
            "tokens": np.concatenate([s.tokens for s in self.buffer]).astype(np.int32),
            **{f: np.concatenate([getattr(x, f) for x in t]) for f in FIELDS},
        }

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "window" not in arrays:
            self.window, self.made_at, self.buffer = -1, -1, []
            return
        self.window, self.made_at = (int(v) for v in arrays["window"])
        ends = np.cumsum(arrays["lengths"])
        starts, self.buffer, offset = ends - arrays["lengths"], [], 0
        for a, e, rs in zip(starts, ends, arrays["resp_start"], strict=True):
            tokens = arrays["tokens"][a:e]
            n = len(tokens) - int(rs)
            fields = {f: arrays[f][offset : offset + n] for f in FIELDS}
            self.buffer.append(StudentSequence(tokens, int(rs), SoftTargets(**fields)))
            offset += n
