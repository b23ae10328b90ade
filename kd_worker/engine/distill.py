"""One distillation job, end to end: the function `kd-worker distill` and the queue worker share.

load -> render prompts -> teacher generates (cached) -> teacher scores (cached)
     -> student sequences -> LoRA training (checkpointed) -> publish gate -> publish
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import structlog

from jobs import publisher
from jobs.config import KDConfig, resolve_config
from jobs.errors import ConfigError, DataError, ModelError, ResourceLimitExceeded, raise_if_stopped
from kd_worker.daemon.runtime import Runtime
from kd_worker.engine import outputs
from kd_worker.engine import teacher as T
from kd_worker.engine.cache import TargetCache, cache_key
from kd_worker.engine.checkpoints import DirCheckpointStore
from kd_worker.engine.data import Example, Sequence_, SoftTargets, load_examples, render_prompt, split_examples
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.trainer import Progress, ProgressFn, StopFn, adapter_weights, attach_lora, train
from kd_worker.engine.types import DistillRequest, Prepared, Scored
from kd_worker.engine.vocab import VocabPlan, plan_vocabulary
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

SCORE_TOKENS_PER_BATCH = 4096


def _check(reason: str | None) -> None:
    raise_if_stopped(reason, "during the teacher phase", "finished work is cached")


def within_memory_budget(should_stop: StopFn, budget: int | None) -> StopFn:
    """should_stop() that first fails the job once MLX's peak memory since the job started (resident
    models included) is over the budget: a clear error instead of swapping or the OOM killer."""
    if budget is None:
        return should_stop

    def check() -> str | None:
        peak = mx.get_peak_memory()
        if peak > budget:
            raise ResourceLimitExceeded(
                f"the job reached {peak:,} bytes of MLX memory (models included), over KD_MAX_JOB_MEMORY={budget:,}; "
                "lower batch_size, max_seq_length, gen_batch_size or gen_max_tokens, or raise the budget"
            )
        return should_stop()

    return check


def _teacher_prompts(lm: LoadedModel, examples: Sequence[Example], cfg: KDConfig) -> list[list[int]]:
    out = []
    for ex in examples:
        ids = render_prompt(lm.tokenizer, ex.prompt)
        if len(ids) >= cfg.max_seq_length - 1:
            raise DataError(
                f"{ex.source}: the prompt is {len(ids)} tokens, longer than max_seq_length={cfg.max_seq_length}; "
                "shorten it or raise the limit (--set max_seq_length=...)"
            )
        out.append(ids)
    return out


def teacher_responses(
    lm: LoadedModel,
    examples: Sequence[Example],
    prompts: Sequence[list[int]],
    cfg: KDConfig,
    cache: TargetCache,
    progress: ProgressFn,
    should_stop: StopFn,
) -> list[list[int]]:
    """Given responses are tokenized; missing ones are generated in batches and cached one by one."""
    gen = dict(
        max_tokens=cfg.gen_max_tokens, temp=cfg.gen_temperature, top_k=cfg.gen_top_k, top_p=cfg.gen_top_p, seed=cfg.seed
    )
    keys = [cache_key(teacher=lm.identity, prompt=p, gen=gen) for p in prompts]
    responses: list[list[int] | None] = []
    todo: list[int] = []
    for i, (ex, p) in enumerate(zip(examples, prompts, strict=True)):
        if ex.response is not None:
            ids = list(lm.hf_tokenizer.encode(ex.response, add_special_tokens=False)) + [lm.eos_id]
            responses.append(ids[: cfg.max_seq_length - len(p)])
            continue
        hit = cache.get_response(keys[i])
        if hit is not None and (not hit or max(hit) >= lm.n_tokens):
            hit = None  # never trust an entry that could gather out of bounds (MLX does not check)
        responses.append(hit)
        if hit is None:
            todo.append(i)
    # resumed and retried jobs regenerate only what no earlier run cached (tests assert on this)
    given = sum(ex.response is not None for ex in examples)
    log.info("teacher_responses", given=given, cached=len(examples) - given - len(todo), to_generate=len(todo))
    sampler = T.make_sampler(cfg.gen_temperature, cfg.gen_top_k, cfg.gen_top_p, lm.n_tokens)
    for start in range(0, len(todo), cfg.gen_batch_size):
        _check(should_stop())
        batch = todo[start : start + cfg.gen_batch_size]
        mx.random.seed(int(examples[batch[0]].key[:8], 16) ^ cfg.seed)
        budgets = [min(cfg.gen_max_tokens, cfg.max_seq_length - len(prompts[i])) for i in batch]
        for i, ids in zip(
            batch, T.generate(lm, [prompts[i] for i in batch], budgets, sampler, cfg.gen_batch_size), strict=True
        ):
            cache.put_response(keys[i], ids)
            responses[i] = ids
        progress(Progress("generate", min(start + len(batch), len(todo)), len(todo)))
    return [r if r else [lm.eos_id] for r in responses]


def teacher_targets(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    cfg: KDConfig,
    plan: VocabPlan,
    cache: TargetCache,
    progress: ProgressFn,
    should_stop: StopFn,
) -> list[SoftTargets]:
    """Sparse soft targets per example; misses are scored in token-budgeted batches and cached."""
    top_k = None if cfg.top_k == "full" else cfg.top_k
    keys = [
        cache_key(teacher=lm.identity, prompt=p, response=r, n_vocab=plan.n_vocab, top_k=top_k, T=cfg.temperature)
        for p, r in zip(prompts, responses, strict=True)
    ]
    out: list[SoftTargets | None] = [cache.get_targets(k) for k in keys]
    todo = [i for i, t in enumerate(out) if t is None]
    log.info("teacher_targets", cached=len(out) - len(todo), to_score=len(todo))
    done, batch, tokens = 0, [], 0
    for pos, i in enumerate(todo):
        batch.append(i)
        tokens += len(prompts[i]) + len(responses[i])
        if tokens < SCORE_TOKENS_PER_BATCH and pos < len(todo) - 1:
            continue
        _check(should_stop())
        for j, t in zip(
            batch,
            T.score(lm, [(prompts[j], responses[j]) for j in batch], plan.n_vocab, top_k, cfg.temperature),
            strict=True,
        ):
            cache.put_targets(keys[j], t)
            out[j] = t
        done += len(batch)
        batch, tokens = [], 0
        progress(Progress("score", done, len(todo)))
    return out  # type: ignore[return-value]


def student_sequences(
    teacher: LoadedModel, student: LoadedModel, scored: Sequence[Scored], cfg: KDConfig, plan: VocabPlan
) -> list[Sequence_]:
    """Same vocabulary: the student's own chat template around the teacher's response ids."""
    if plan.mode == "cross":
        from kd_worker.engine import xtok

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
        seqs.append(Sequence_(tokens, len(prompt), t))
    return seqs


def require_trainable(student: LoadedModel, cfg: KDConfig) -> None:
    """LoRA that attached nowhere (lora_keys naming no layer) would train nothing: refuse it clearly."""
    if adapter_weights(student.model):
        return
    linear = sorted(n for n, m in student.model.layers[0].named_modules() if n and "Linear" in type(m).__name__)
    raise ConfigError(
        f"lora_keys={list(cfg.lora_keys or [])} match no layer of the student {student.path}; "
        f"the linear layers of its blocks are {linear}"
    )


def prepare(
    teacher: LoadedModel,
    student: LoadedModel,
    train_ex: list[Example],
    val_ex: list[Example],
    cfg: KDConfig,
    cache: TargetCache,
    progress: ProgressFn,
    should_stop: StopFn,
) -> Prepared:
    """Vocabulary plan, teacher responses and targets (cached), student sequences."""
    plan = plan_vocabulary(teacher, student, allow_cross=True)  # different tokenizers: kd_worker.engine.xtok
    ordered = train_ex + val_ex
    prompts = _teacher_prompts(teacher, ordered, cfg)
    t0 = time.perf_counter()
    responses = teacher_responses(teacher, ordered, prompts, cfg, cache, progress, should_stop)
    targets = teacher_targets(teacher, prompts, responses, cfg, plan, cache, progress, should_stop)
    teacher_s = time.perf_counter() - t0
    scored = [Scored(e, r, t) for e, r, t in zip(ordered, responses, targets, strict=True)]
    seqs = student_sequences(teacher, student, scored, cfg, plan)
    return Prepared(plan, targets, seqs[: len(train_ex)], seqs[len(train_ex) :], teacher_s)


def conclude(
    req: DistillRequest,
    settings: WorkerSettings,
    cfg: KDConfig,
    teacher: LoadedModel,
    student: LoadedModel,
    data: Prepared,
    result,
    store: DirCheckpointStore,
    skip: str | None,
    progress: ProgressFn,
    n_examples: int,
) -> dict[str, Any]:
    """Publish gate, then publish (or record why not); returns the outcome."""
    if req.reuse_outcome and (mine := outputs.own_version(settings.adapters_dir, req)) is not None:
        log.info("run_already_published", run_id=req.run_id, version=mine["version"])
        return mine  # a retry after this run's version went live: never twice
    identity = outputs.identity_doc(teacher, student, cfg, data.plan)
    after = result.history["val"][-1]  # step 0 is always evaluated, so never empty
    if skip:
        gate = {"decision": "skip", "reason": skip}
    else:
        progress(Progress("validate", 0, 1))
        gate = outputs.publish_gate(
            student, data.val, cfg, data.plan.student_vocab, settings, req.domain, after, identity
        )
    metrics = outputs.metrics_doc(result, gate, n_examples, data)
    outcome = {"domain": req.domain, "run_id": req.run_id, "gate": gate, "before": metrics["before"], "after": after}
    if skip or (gate["decision"] == "reject" and not req.force_publish):
        if not skip:
            publisher.record_rejection(settings.adapters_dir, req.domain, {"job_id": req.job_id, **gate})
        return {**outcome, "published": False}
    entry = {
        "job_id": req.job_id,
        "run_id": req.run_id,
        **identity,
        "metrics": {"before": metrics["before"], "after": after},
        "data": metrics["data"],
        "gate": gate,
        "forced": req.force_publish and gate["decision"] == "reject",
    }
    config_doc = {
        "fine_tune_type": "lora",
        **{k: identity["adapter"][k] for k in ("num_layers", "lora_parameters")},
        "kd": {"config": cfg.model_dump(mode="json"), **identity},
    }
    progress(Progress("publish", 0, 1))
    version = publisher.publish(
        settings.adapters_dir,
        req.domain,
        lambda stage: outputs.write_version(stage, student, cfg, store, config_doc, metrics),
        entry,
        keep=settings.keep_versions,
    )
    progress(Progress("publish", 1, 1))
    log.info("distillation_published", domain=req.domain, version=version.number, path=str(version.path))
    return {**outcome, "published": True, "version": version.number, "adapter_path": str(version.path)}


def run_distillation(
    req: DistillRequest,
    runtime: Runtime,
    settings: WorkerSettings,
    progress: ProgressFn,
    should_stop: StopFn,
    publish_guard: Callable[[], AbstractContextManager[str | None]] = contextlib.nullcontext,
) -> dict[str, Any]:
    """The whole job; returns a JSON-ready outcome (published version, metrics, timings).
    `publish_guard` wraps gate + publish: the queue worker uses it to publish the jobs of one
    domain in submission order; it yields None to go ahead, or a reason to skip publishing."""
    t_start = time.perf_counter()
    run_dir = settings.work_dir / "runs" / req.run_id
    if req.reuse_outcome and (done := _read_outcome(run_dir)) is not None:
        log.info("run_already_done", run_id=req.run_id, published=done.get("published"))
        return done  # a retry after the job's bookkeeping (not its work) failed: never publish twice
    cfg = resolve_config(settings.kd_defaults, req.overrides)
    examples = load_examples(req.data, settings.max_examples)  # bad data fails before any model loads
    train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    teacher = runtime.teacher(req.teacher)
    cache = TargetCache(settings.work_dir / "cache")
    mx.reset_peak_memory()
    should_stop = within_memory_budget(should_stop, settings.max_job_memory)
    with runtime.student(req.student) as student:
        data = prepare(teacher, student, train_ex, val_ex, cfg, cache, progress, should_stop)
        attach_lora(student.model, cfg)
        require_trainable(student, cfg)
        store = DirCheckpointStore(run_dir / "checkpoints")
        result = train(student, cfg, data.train, data.val, data.plan.student_vocab, store, progress, should_stop)
        with publish_guard() as skip:
            outcome = conclude(req, settings, cfg, teacher, student, data, result, store, skip, progress, len(examples))
    outcome.setdefault("seconds", time.perf_counter() - t_start)
    return _finish_run(run_dir, outcome)


def _read_outcome(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "outcome.json").read_text())
    except (OSError, ValueError):
        return None


def _finish_run(run_dir: Path, outcome: dict[str, Any]) -> dict[str, Any]:
    """Keep only the outcome of a finished run (checkpoints are in the published version)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    publisher.write_json_atomic(run_dir / "outcome.json", outcome)
    return outcome
