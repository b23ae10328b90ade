"""The teacher's two jobs: generate responses (batched), then score prompt+response in one
teacher-forced pass into sparse soft targets (top-k log-probs at T=1 + exact tail mass +
the full-vocabulary log-sum-exp at the job's temperature). Full-vocabulary rows never leave
this module: a Qwen row is ~600 KB in float32."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from kd_worker.data import SoftTargets
from kd_worker.models import LoadedModel, head_logits, hidden_at

SCORE_CHUNK = 256  # positions per LM-head chunk while scoring: caps [chunk, V] memory
TOP_P_PRESELECT = 1024  # top-p without top-k still only sorts this many candidates


def make_sampler(temperature: float, top_k: int, top_p: float, n_vocab: int) -> Callable[[mx.array], mx.array]:
    """Temperature / top-k / top-p sampling that never sorts the whole vocabulary: top-p runs on
    a top-k pre-selection (mlx-lm's apply_top_p sorts all V entries every decoding step).
    Only real tokens (< n_vocab) can be drawn: embedding padding rows are never sampled."""
    k = top_k or (TOP_P_PRESELECT if top_p < 1.0 else 0)

    def sample(logprobs: mx.array) -> mx.array:
        logprobs = logprobs[..., :n_vocab]
        if temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if k == 0 or k >= logprobs.shape[-1]:
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
) -> list[list[int]]:
    """Responses for a batch of prompts, each ending with the stop token when the teacher stopped
    (mlx-lm's batch_generate drops it; the student must learn to stop, so it is kept)."""
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
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
    finally:
        gen.close()
    return [out[u] for u in uids]


def _targets_from_logits(logits: mx.array, top_k: int, temperature: float) -> tuple[mx.array, ...]:
    """[n, V] float32 logits -> sorted top-k ids/log-probs, exact tail log-mass, lse at T."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    n, v = logp.shape
    k = min(top_k, v)
    idx = mx.argpartition(-logp, kth=k - 1, axis=-1)[:, :k] if k < v else mx.broadcast_to(mx.arange(v), (n, v))
    vals = mx.take_along_axis(logp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx, vals = mx.take_along_axis(idx, order, -1), mx.take_along_axis(vals, order, -1)
    if k < v:
        in_support = mx.put_along_axis(mx.zeros((n, v), mx.bool_), idx, mx.array(True), axis=-1)
        tail = mx.logsumexp(mx.where(in_support, float("-inf"), logp), axis=-1)
    else:
        tail = mx.full((n,), float("-inf"))
    lse_t = mx.zeros((n,)) if temperature == 1.0 else mx.logsumexp(logp / temperature, axis=-1)
    return idx.astype(mx.int32), vals, tail, lse_t


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
    hidden = hidden_at(lm, mx.array(inputs), mx.array(flat))
    chunks = []
    for start in range(0, len(flat), SCORE_CHUNK):
        logits = head_logits(lm, hidden[start : start + SCORE_CHUNK], n_vocab)
        parts = _targets_from_logits(logits, k, temperature)
        mx.eval(*parts)
        chunks.append([np.array(a) for a in parts])
    ids, logp, tail, lse_t = (np.concatenate([c[i] for c in chunks]) for i in range(4))
    out, offset = [], 0
    for _, r in sequences:
        sl = slice(offset, offset + len(r))
        out.append(SoftTargets(ids[sl], logp[sl], tail[sl], lse_t[sl], np.ones(len(r), np.float32)))
        offset += len(r)
    return out
