"""One distillation job, from examples to a candidate adapter: the pipeline `kd-worker distill`
and the queue worker share.

    examples (+ replayed history, regression set) -> teacher prompts -> responses (generated,
      cached) -> targets (scored, cached) -> student sequences -> LoRA layers (warm-started from
      the published adapter when asked) -> training (checkpointed, replay mixed in; on_policy > 0:
      student rollouts scored by the teacher, engine.onpolicy) -> the selected step
      (engine.selection) -> Candidate

What happens to the candidate is the caller's: `engine.gate.publish_gate` judges it and
`engine.outputs.publish` hands it to `jobs.publisher`, the only writer of adapters_kd/.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from jobs.config import KDConfig
from jobs.errors import ConfigError, DataError, ModelError
from kd_worker.engine import onpolicy, outputs, selection, xtok
from kd_worker.engine.batches import BatchSource, training_batches
from kd_worker.engine.checkpoints import DirCheckpointStore
from kd_worker.engine.data import Example, StudentSequence, render_prompt, split_examples
from kd_worker.engine.hooks import HookList, Hooks
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.objective import Objective
from kd_worker.engine.samples import Probe
from kd_worker.engine.teacher import Teacher
from kd_worker.engine.trainer import adapter_weights, attach_lora, train
from kd_worker.engine.types import Candidate, Continual, DistillRequest, Prepared, Scored
from kd_worker.engine.vocab import VocabPlan, plan_vocabulary
from kd_worker.engine.warmstart import warm_start

log = structlog.get_logger(__name__)


def student_sequences(
    teacher: LoadedModel, student: LoadedModel, scored: Sequence[Scored], cfg: KDConfig, plan: VocabPlan
) -> list[StudentSequence]:
    """Same vocabulary: the student's own chat template around the teacher's response ids."""
    if plan.mode == "cross":
        return xtok.student_sequences(teacher, student, scored, cfg, plan)
    seqs = []
    for s in scored:
        prompt = render_prompt(student.tokenizer, s.example.prompt)
        n = min(len(s.response_ids), cfg.max_seq_length - len(prompt))
        if n < 1:
            raise DataError(f"{s.example.source}: no room for a response within max_seq_length={cfg.max_seq_length}")
        tokens = np.asarray(prompt + s.response_ids[:n], np.int32)
        t = s.targets.head(n)
        if tokens.max() >= plan.n_vocab or t.ids.max() >= plan.n_vocab:
            raise ModelError(f"{s.example.source}: a token id is outside the shared vocabulary of {plan.n_vocab}")
        seqs.append(StudentSequence(tokens, len(prompt), t))
    return seqs


def require_trainable(student: LoadedModel, cfg: KDConfig) -> None:
    """LoRA that attached nowhere (lora_keys naming no layer) would train nothing: refuse it clearly."""
    if adapter_weights(student.model):
        return
    block = student.model.layers[0]  # mlx-lm models expose their blocks as `layers`
    linear = sorted(n for n, m in block.named_modules() if n and "Linear" in type(m).__name__)
    raise ConfigError(
        f"lora_keys={list(cfg.lora_keys or [])} match no layer of the student {student.path}; "
        f"the linear layers of its blocks are {linear}"
    )


def fits(example: Example, cfg: KDConfig, *tokenizers: Any) -> bool:
    """Whether the example's prompt leaves room for a response under max_seq_length in each tokenizer."""
    return all(len(render_prompt(t, example.prompt)) < cfg.max_seq_length - 1 for t in tokenizers)


def fitting(
    teacher: Teacher, student: LoadedModel, examples: Sequence[Example], cfg: KDConfig, what: str
) -> list[Example]:
    """History examples whose prompt leaves room for a response in both tokenizers. A job's own
    overlong prompt is a DataError; another job's, admitted under its own max_seq_length, is skipped."""
    keep = [e for e in examples if fits(e, cfg, teacher.lm.tokenizer, student.tokenizer)]
    if len(keep) < len(examples):
        log.warning(
            "history_examples_skipped", what=what, skipped=len(examples) - len(keep), max_seq_length=cfg.max_seq_length
        )
    return keep


def prepare(
    teacher: Teacher,
    student: LoadedModel,
    train_ex: list[Example],
    val_ex: list[Example],
    cfg: KDConfig,
    hooks: Hooks,
    continual: Continual | None = None,
) -> Prepared:
    """Vocabulary plan, teacher responses and targets (cached), student sequences: for the job's
    own examples and, in the same teacher pass, the replayed and regression-set ones (their targets
    come from the cache unless the teacher changed)."""
    plan = plan_vocabulary(teacher.lm, student, allow_cross=True)  # different tokenizers: engine.xtok
    onpolicy.check_pair(plan, cfg)  # before any teacher work
    continual = continual or Continual()
    replay = fitting(teacher, student, continual.replay, cfg, "replay")
    regression = fitting(teacher, student, continual.regression, cfg, "regression set")
    parts = [train_ex, val_ex, replay, regression]
    ordered = [e for part in parts for e in part]
    prompts = teacher.prompts(ordered, cfg.max_seq_length)
    t0 = time.perf_counter()
    responses = teacher.responses(ordered, prompts, cfg, hooks)
    targets = teacher.targets(prompts, responses, cfg, plan.n_vocab, hooks)
    teacher_s = time.perf_counter() - t0
    scored = [Scored(e, r, t) for e, r, t in zip(ordered, responses, targets, strict=True)]
    seqs = student_sequences(teacher.lm, student, scored, cfg, plan)
    cut = np.cumsum([len(p) for p in parts])
    train, val, replayed, held = (seqs[a:b] for a, b in zip([0, *cut[:-1]], cut, strict=True))
    own = len(train_ex) + len(val_ex)
    return Prepared(plan, targets[:own], train, val, teacher_s, replayed, held, [e.key for e in replay])


def distill(
    request: DistillRequest,
    cfg: KDConfig,
    examples: list[Example],
    teacher: Teacher,
    student: LoadedModel,
    checkpoints: Path,
    hooks: Hooks,
    continual: Continual | None = None,
) -> Candidate:
    """Train a candidate adapter for `request` on `examples` (already loaded and validated, so bad
    data fails before any model loads), with `continual`'s replayed history in its batches and its
    warm start. LoRA layers are attached to `student.model`; the caller owns removing them. A run
    whose `checkpoints` directory holds a checkpoint resumes from it."""
    continual = continual or Continual()
    train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    data = prepare(teacher, student, train_ex, val_ex, cfg, hooks, continual)
    probe = Probe.choose(val_ex, data.val, cfg.samples)  # readable held-out answers, before and after
    before = probe.greedy(student, cfg, hooks)
    attach_lora(student.model, cfg)
    require_trainable(student, cfg)
    identity = outputs.identity_doc(teacher.lm, student, cfg, data.plan)
    init = warm_start(student, identity["adapter"], cfg.init, continual.init_from)  # a checkpoint overrides it
    store = DirCheckpointStore(checkpoints)
    objective = Objective.from_config(cfg, data.plan.student_vocab)
    offline = training_batches(data.train, data.replay, cfg.batch_size, cfg.replay, cfg.seed)
    batches = with_rollouts(offline, teacher, student, train_ex, data, cfg, hooks)
    if cfg.patience:  # primed with the history of the checkpoint the run resumes from, if any
        resumed = store.latest()
        hooks = HookList(hooks, selection.Patience(cfg.patience, resumed[2]["history"]["val"] if resumed else ()))
    result = train(student, batches, objective, store, hooks, selection.schedule(cfg), data.val)
    last = selection.last_step(result.history)
    chosen = selection.choose(result.history["val"], cfg.select, last)
    if chosen.step != last:  # select=best: the selected step's adapter, from its checkpoint
        student.model.load_weights(list(store.adapter(chosen.step).items()), strict=False)
    samples = probe.documents(student, before, probe.greedy(student, cfg, hooks))  # the published adapter's
    return Candidate(
        request,
        cfg,
        teacher.lm,
        student,
        data,
        result,
        store,
        len(examples),
        identity,
        init=init,
        samples=samples,
        selected=chosen.doc(),
    )


def with_rollouts(
    offline: BatchSource,
    teacher: Teacher,
    student: LoadedModel,
    train_ex: list[Example],
    data: Prepared,
    cfg: KDConfig,
    hooks: Hooks,
) -> BatchSource:
    """The offline (or replay) batches; with on_policy > 0, a share of steps on student rollouts of
    the job's own training prompts (replayed history stays offline: it guards what was learnt)."""
    if cfg.on_policy == 0:
        return offline
    prompts = list(
        zip(
            [render_prompt(student.tokenizer, e.prompt) for e in train_ex],
            teacher.prompts(train_ex, cfg.max_seq_length),
            strict=True,
        )
    )
    return onpolicy.OnPolicyBatches(
        offline,
        student,
        teacher.lm,
        prompts,
        onpolicy.RolloutSettings.from_config(cfg, data.plan.n_vocab),
        onpolicy.on_policy_objective(cfg, data.plan.student_vocab),
        hooks,
    )
