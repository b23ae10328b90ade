"""The teacher's two jobs: generate responses (batched), then score prompt+response in one
teacher-forced pass into sparse soft targets (top-k log-probs at T=1 + exact tail mass +
the full-vocabulary log-sum-exp at the job's temperature). Full-vocabulary rows never leave
this module: a Qwen row is ~600 KB in float32.

`Teacher` is the one object a job talks to: it owns the resident model and the content-addressed
target cache, so reruns, retries and resumed jobs redo no teacher work. The module functions
below it (sampling, batched generation, scoring) are its pure-ish parts, tested on their own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import mlx.core as mx
import numpy as np
import structlog

from jobs.config import KDConfig
from jobs.errors import DataError
from kd_worker.engine.cache import TargetCache, cache_key
from kd_worker.engine.data import Example, SoftTargets, render_prompt
from kd_worker.engine.hooks import Hooks, Progress, check_stop
from kd_worker.engine.models import LoadedModel, logit_chunks

log = structlog.get_logger(__name__)

SCORE_CHUNK = 256  # positions per LM-head chunk while scoring: caps [chunk, V] memory
TOP_P_PRESELECT = 1024  # top-p without top-k still only sorts this many candidates
STOP_CHECK_STEPS = 32  # decode steps between stop checks during generation
SCORE_TOKENS_PER_BATCH = 4096  # prompt + response tokens per teacher-forced scoring batch


def make_sampler(temperature: float, top_k: int, top_p: float, n_vocab: int) -> Callable[[mx.array], mx.array]:
    """Temperature / top-k / top-p sampling that never sorts the whole vocabulary: top-p runs on
    a top-k pre-selection (mlx-lm's apply_top_p sorts all V entries every decoding step).
    Only real tokens (< n_vocab) can be drawn: embedding padding rows are never sampled."""
    k_max = top_k or (TOP_P_PRESELECT if top_p < 1.0 else 0)

    def sample(logprobs: mx.array) -> mx.array:
        logprobs = logprobs[..., :n_vocab]
        if temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        k = min(k_max, logprobs.shape[-1])  # a vocabulary within top-k still gets its top-p cut
        if k == 0 or (k == logprobs.shape[-1] and top_p >= 1.0):
            return mx.random.categorical(logprobs / temperature)
        idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        vals = mx.take_along_axis(logprobs, idx, axis=-1) / temperature
        if top_p < 1.0:
            order = mx.argsort(-vals, axis=-1)
            vals, idx = mx.take_along_axis(vals, order, -1), mx.take_along_axis(idx, order, -1)
            probs = mx.softmax(vals, axis=-1)
            keep = (mx.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the first
            vals = mx.where(keep, vals, float("-inf"))
        choice = mx.random.categorical(vals)
        return mx.take_along_axis(idx, choice[..., None], axis=-1).squeeze(-1)

    return sample


def generate(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    sampler: Callable[[mx.array], mx.array],
    batch_size: int,
    check_stop: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Responses for a batch of prompts, each ending with the stop token when the teacher stopped
    (mlx-lm's batch_generate drops it; the student must learn to stop, so it is kept).
    `check_stop` (raises to stop) runs every STOP_CHECK_STEPS decode steps: a long generation
    at real sizes must still end inside the service manager's stop timeout."""
    from mlx_lm.generate import BatchGenerator

    stop = sorted(lm.tokenizer.eos_token_ids)
    gen = BatchGenerator(
        lm.model,
        stop_tokens=[[t] for t in stop],
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert([list(p) for p in prompts], list(max_tokens))
        out: dict[int, list[int]] = {u: [] for u in uids}
        decoded = 0
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
            decoded += 1
            if check_stop is not None and decoded % STOP_CHECK_STEPS == 0:
                check_stop()
    finally:
        gen.close()
    return [out[u] for u in uids]


TAIL_FLOOR = 2.0**-24  # fp32 resolution of (total - support) mass; smaller tails read as this


def targets_from_logits(logits: np.ndarray, top_k: int, temperature: float) -> tuple[np.ndarray, ...]:
    """[n, V] float32 logits -> sorted top-k ids/log-probs, tail log-mass, lse at T.

    numpy, not MLX: scoring needs no gradient, and on the CPU backend numpy's vectorised exp and
    argpartition are ~20x and ~7x faster over a 152k-wide row (bench/datagen.py); on Metal the
    copy out of unified memory is cheap. One exp serves all three outputs: the tail is the total
    minus the support's mass (exact to fp32 resolution, TAIL_FLOOR), the tempered sum reuses it.
    Works in place on one [n, V] buffer: fresh 150 MB temporaries per chunk cost page faults."""
    n, v = logits.shape
    k = min(top_k, v)
    x = logits - logits.max(axis=-1, keepdims=True)  # the one [n, V] buffer
    idx = np.argpartition(x, v - k, axis=-1)[:, v - k :] if k < v else np.broadcast_to(np.arange(v), (n, v))
    top = np.take_along_axis(x, idx, axis=-1)
    tempered = None if temperature in (1.0, 2.0) else np.exp(x / temperature).sum(axis=-1)
    np.exp(x, out=x)
    total = x.sum(axis=-1)
    log_total = np.log(total)
    tail = np.full(n, -np.inf)
    if k < v:
        rest = total - np.take_along_axis(x, idx, axis=-1).sum(axis=-1)
        tail = np.log(np.maximum(rest, total * TAIL_FLOOR)) - log_total
    if temperature == 1.0:
        lse_t = np.zeros(n)
    else:
        if tempered is None:  # T = 2: exp(x / 2) = sqrt(exp(x)), far cheaper than a second exp
            tempered = np.sqrt(x, out=x).sum(axis=-1)
        lse_t = np.log(tempered) - log_total / temperature
    vals = top - log_total[:, None]
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
    f32 = np.float32
    return ids.astype(np.int32), vals.astype(f32), tail.astype(f32), lse_t.astype(f32)


def score(
    lm: LoadedModel,
    sequences: Sequence[tuple[list[int], list[int]]],
    n_vocab: int,
    top_k: int | None,
    temperature: float,
) -> list[SoftTargets]:
    """Teacher-forced targets for (prompt_ids, response_ids) pairs, one forward pass per batch."""
    k = n_vocab if top_k is None else min(top_k, n_vocab)
    width = max(len(p) + len(r) for p, r in sequences) - 1
    inputs = np.zeros((len(sequences), width), np.int32)
    positions = []
    for b, (p, r) in enumerate(sequences):
        full = list(p) + list(r)
        inputs[b, : len(full) - 1] = full[:-1]
        positions.append(b * width + len(p) - 1 + np.arange(len(r)))
    flat = np.concatenate(positions).astype(np.int32)
    ids, logp = np.zeros((len(flat), k), np.int32), np.zeros((len(flat), k), np.float32)
    tail, lse_t = np.zeros(len(flat), np.float32), np.zeros(len(flat), np.float32)
    chunks = logit_chunks(lm, inputs, flat, n_vocab, SCORE_CHUNK)
    pending = next(chunks, None)
    while pending is not None:
        idx, logits = pending
        mx.async_eval(logits)
        pending = next(chunks, None)  # MLX computes the next chunk while numpy post-processes this one
        if pending is not None:
            mx.async_eval(pending[1])
        mx.eval(logits)
        ids[idx], logp[idx], tail[idx], lse_t[idx] = targets_from_logits(np.array(logits, copy=False), k, temperature)
    out, offset = [], 0
    for _, r in sequences:
        sl = slice(offset, offset + len(r))
        out.append(SoftTargets(ids[sl], logp[sl], tail[sl], lse_t[sl], np.ones(len(r), np.float32)))
        offset += len(r)
    return out


class Teacher:
    """The resident teacher's work for a job: render prompts, generate the responses not given
    (batched, cached), score prompt+response pairs into sparse targets (batched, cached)."""

    def __init__(self, lm: LoadedModel, cache: TargetCache):
        self.lm, self.cache = lm, cache

    def prompts(self, examples: Sequence[Example], max_seq_length: int) -> list[list[int]]:
        """Prompt ids in the teacher's chat template; a prompt that leaves no room is a DataError."""
        out = []
        for ex in examples:
            ids = render_prompt(self.lm.tokenizer, ex.prompt)
            if len(ids) >= max_seq_length - 1:
                raise DataError(
                    f"{ex.source}: the prompt is {len(ids)} tokens, longer than max_seq_length={max_seq_length}; "
                    "shorten it or raise the limit (--set max_seq_length=...)"
                )
            out.append(ids)
        return out

    def responses(
        self, examples: Sequence[Example], prompts: Sequence[list[int]], cfg: KDConfig, hooks: Hooks
    ) -> list[list[int]]:
        """Given responses are tokenized; missing ones are generated in batches and cached one by one."""
        lm = self.lm
        gen = dict(temp=cfg.gen_temperature, top_k=cfg.gen_top_k, top_p=cfg.gen_top_p, seed=cfg.seed)
        # the budget left by max_seq_length is part of the key: a response cut short by a small one
        # is not what a run with room would generate (equal to gen_max_tokens: the keys of old entries)
        budgets = [min(cfg.gen_max_tokens, cfg.max_seq_length - len(p)) for p in prompts]
        keys = [
            cache_key(teacher=lm.identity, prompt=p, gen={**gen, "max_tokens": n})
            for p, n in zip(prompts, budgets, strict=True)
        ]
        responses: list[list[int] | None] = []
        todo: list[int] = []
        for i, (ex, p) in enumerate(zip(examples, prompts, strict=True)):
            if ex.response is not None:
                ids = list(lm.hf_tokenizer.encode(ex.response, add_special_tokens=False)) + [lm.eos_id]
                responses.append(ids[: cfg.max_seq_length - len(p)])
                continue
            hit = self.cache.get_response(keys[i])
            if hit is not None and (not hit or max(hit) >= lm.n_tokens):
                hit = None  # never trust an entry that could gather out of bounds (MLX does not check)
            responses.append(hit)
            if hit is None:
                todo.append(i)
        # resumed and retried jobs regenerate only what no earlier run cached (tests assert on this)
        given = sum(ex.response is not None for ex in examples)
        log.info("teacher_responses", given=given, cached=len(examples) - given - len(todo), to_generate=len(todo))
        sampler = make_sampler(cfg.gen_temperature, cfg.gen_top_k, cfg.gen_top_p, lm.n_tokens)

        def stop_check() -> None:
            check_stop(hooks, "during the teacher phase", "finished work is cached")

        for start in range(0, len(todo), cfg.gen_batch_size):
            stop_check()
            batch = todo[start : start + cfg.gen_batch_size]
            mx.random.seed(int(examples[batch[0]].key[:8], 16) ^ cfg.seed)
            generated = generate(
                lm, [prompts[i] for i in batch], [budgets[i] for i in batch], sampler, cfg.gen_batch_size, stop_check
            )
            for i, ids in zip(batch, generated, strict=True):
                self.cache.put_response(keys[i], ids)
                responses[i] = ids
            hooks.on_progress(Progress("generate", min(start + len(batch), len(todo)), len(todo)))
        return [r if r else [lm.eos_id] for r in responses]

    def targets(
        self, prompts: Sequence[list[int]], responses: Sequence[list[int]], cfg: KDConfig, n_vocab: int, hooks: Hooks
    ) -> list[SoftTargets]:
        """Sparse soft targets per example; misses are scored in token-budgeted batches and cached."""
        top_k = None if cfg.top_k == "full" else cfg.top_k
        keys = [
            cache_key(teacher=self.lm.identity, prompt=p, response=r, n_vocab=n_vocab, top_k=top_k, T=cfg.temperature)
            for p, r in zip(prompts, responses, strict=True)
        ]
        out: list[SoftTargets | None] = [self.cache.get_targets(k) for k in keys]
        todo = [i for i, t in enumerate(out) if t is None]
        log.info("teacher_targets", cached=len(out) - len(todo), to_score=len(todo))
        done, batch, tokens = 0, [], 0
        for pos, i in enumerate(todo):
            batch.append(i)
            tokens += len(prompts[i]) + len(responses[i])
            if tokens < SCORE_TOKENS_PER_BATCH and pos < len(todo) - 1:
                continue
            check_stop(hooks, "during the teacher phase", "finished work is cached")
            scored = score(self.lm, [(prompts[j], responses[j]) for j in batch], n_vocab, top_k, cfg.temperature)
            for j, t in zip(batch, scored, strict=True):
                self.cache.put_targets(keys[j], t)
                out[j] = t
            done += len(batch)
            batch, tokens = [], 0
            hooks.on_progress(Progress("score", done, len(todo)))
        return cast(list[SoftTargets], out)  # every miss was scored above
