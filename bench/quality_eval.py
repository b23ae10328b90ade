"""Held-out metrics of a student against the teacher, computed here (not by the engine):

accuracy     exact match of the greedy answer against the correct set (`fixtures.digits.check`)
kl           KL(teacher || student) at T=1 over the *full* vocabulary, per response token, on
             responses the teacher sampled (T=1) for the held-out prompts, EOS included
             (the engine's own `kl` is over the top-k + tail buckets: a lower bound)
top1         share of those positions where the student's argmax is the teacher's
self_kl      the same KL on the student's *own* greedy responses (what exposure bias moves:
             on-policy distillation trains on such samples; the teacher's own is 0)
answer_kl    KL at the answer position over the ten digits + one "anything else" bucket:
             tokenizer-agnostic (every digit is one token in both tokenizers), so it also
             scores the cross-tokenizer student
valid_mass   the student's probability on correct answers at the answer position
ece          expected calibration error (10 equal-width bins) of the answer token on the
             single-answer questions (max/min): confidence = the student's top probability,
             correct = its argmax is the answer (its first digit, for sort). Set questions are
             left out: a student that spreads 1/3 over three correct answers is right, not
             under-confident.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from kd_worker.engine.data import render_prompt
from kd_worker.engine.teacher import generate, make_sampler
from kd_worker.fixtures import digits as task

DIGITS = [str(d) for d in range(10)]


@dataclass
class Reference:
    """What the teacher did on the held-out prompts; computed once per benchmark run."""

    items: list[task.Item]
    response_ids: list[list[int]]  # the teacher's sampled responses (T=1), EOS included
    logp: list[np.ndarray]  # [n_i, V] teacher log-probs at those response positions
    answer_p: np.ndarray  # [n, 11] teacher probabilities over the digits + other at the answer position
    metrics: dict[str, float]  # the teacher's own accuracy etc.


def load(path: Path, adapter: Path | None = None) -> SimpleNamespace:
    import mlx_lm

    model, tok = mlx_lm.load(str(path), adapter_path=str(adapter) if adapter else None)
    model.set_dtype(mx.float32)
    model.eval()
    n = len(tok._tokenizer)
    digit_ids = [tok._tokenizer.convert_tokens_to_ids(d) for d in DIGITS]
    return SimpleNamespace(model=model, tokenizer=tok, n_tokens=n, digit_ids=np.array(digit_ids), path=path)


def prompts_of(lm, items: Sequence[task.Item]) -> list[list[int]]:
    return [render_prompt(lm.tokenizer, it.messages) for it in items]


def greedy_ids(lm, items: Sequence[task.Item], max_tokens: int = 8, batch: int = 64) -> list[list[int]]:
    """The greedy responses' token ids, the stop token kept when the model stopped."""
    return generate(lm, prompts_of(lm, items), [max_tokens] * len(items), make_sampler(0.0, 0, 1.0, lm.n_tokens), batch)


def decode(lm, ids: Sequence[int]) -> str:
    eos = set(lm.tokenizer.eos_token_ids)
    return lm.tokenizer.decode([t for t in ids if t not in eos])


def greedy(lm, items: Sequence[task.Item], max_tokens: int = 8, batch: int = 64) -> list[str]:
    return [decode(lm, ids) for ids in greedy_ids(lm, items, max_tokens, batch)]


def sample(lm, items: Sequence[task.Item], seed: int, max_tokens: int = 8, batch: int = 64) -> list[list[int]]:
    mx.random.seed(seed)
    return generate(lm, prompts_of(lm, items), [max_tokens] * len(items), make_sampler(1.0, 0, 1.0, lm.n_tokens), batch)


def forced_logp(lm, prompts: Sequence[list[int]], responses: Sequence[list[int]], batch: int = 64) -> list[np.ndarray]:
    """Teacher-forced log-softmax [len(response), V] at each response position (real tokens only)."""
    out = []
    for s in range(0, len(prompts), batch):
        ps, rs = prompts[s : s + batch], responses[s : s + batch]
        width = max(len(p) + len(r) for p, r in zip(ps, rs, strict=True)) - 1
        x = np.zeros((len(ps), width), np.int32)
        for b, (p, r) in enumerate(zip(ps, rs, strict=True)):
            full = list(p) + list(r)
            x[b, : len(full) - 1] = full[:-1]
        logits = lm.model(mx.array(x))[..., : lm.n_tokens].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        for b, (p, r) in enumerate(zip(ps, rs, strict=True)):
            out.append(logp[b, len(p) - 1 : len(p) - 1 + len(r)])
    return out


def answer_probs(logp_row: np.ndarray, digit_ids: np.ndarray) -> np.ndarray:
    """[11]: probabilities of the ten digits and of everything else at the answer position."""
    p = np.exp(logp_row[digit_ids].astype(np.float64))
    return np.append(p, max(1.0 - p.sum(), 0.0))


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(confidence) * abs(correct[m].mean() - confidence[m].mean())
    return float(total)


def _kl(p: np.ndarray, lq: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return (p * (lp - lq)).sum(axis=-1)


def reference(teacher, items: Sequence[task.Item], seed: int, max_tokens: int = 8) -> Reference:
    responses = sample(teacher, items, seed, max_tokens)
    logp = forced_logp(teacher, prompts_of(teacher, items), responses)
    answer_p = np.stack([answer_probs(lp[0], teacher.digit_ids) for lp in logp])
    ref = Reference(list(items), responses, logp, answer_p, {})
    ref.metrics = score(teacher, ref, same_vocab=True, teacher=teacher, max_tokens=max_tokens)
    return ref


def self_kl(teacher, lm, items: Sequence[task.Item], responses: Sequence[list[int]]) -> float:
    """KL(teacher || student) at T=1 over the full vocabulary per token on the student's *own*
    greedy responses (stop token included): the number exposure bias moves."""
    keep = [i for i, r in enumerate(responses) if r]
    its, rs = [items[i] for i in keep], [responses[i] for i in keep]
    lp = forced_logp(teacher, prompts_of(teacher, its), rs)
    lq = forced_logp(lm, prompts_of(lm, its), rs)
    return float(np.concatenate([_kl(np.exp(p), q, p) for p, q in zip(lp, lq, strict=True)]).mean())


def score(lm, ref: Reference, same_vocab: bool, teacher=None, max_tokens: int = 8) -> dict[str, float]:
    """Every metric of `lm` on the held-out set (token-level KL/top-1 only with the teacher's
    vocabulary; `teacher` given: also the KL on the student's own greedy samples)."""
    items = ref.items
    ids = greedy_ids(lm, items, max_tokens)
    answers = [decode(lm, r) for r in ids]
    ok = np.array([task.check(it, a) for it, a in zip(items, answers, strict=True)])
    single = np.array([it.single for it in items])
    out: dict[str, float] = {"accuracy": ok.mean(), "acc_single": ok[single].mean()}
    if (~single).any():  # the sort task has no set questions
        out["acc_set"] = ok[~single].mean()
    prompts = prompts_of(lm, items)
    if same_vocab:
        logq = forced_logp(lm, prompts, ref.response_ids)
        kl = np.concatenate([_kl(np.exp(lp), lq, lp) for lp, lq in zip(ref.logp, logq, strict=True)])
        top1 = np.concatenate([lp.argmax(-1) == lq.argmax(-1) for lp, lq in zip(ref.logp, logq, strict=True)])
        first = np.stack([lq[0] for lq in logq])
        out.update(kl=kl.mean(), top1=top1.mean())
        if teacher is not None:
            out["self_kl"] = self_kl(teacher, lm, items, ids)
    else:  # the student's own rendering of the prompt; only the answer position is compared
        first = np.stack([lq[0] for lq in forced_logp(lm, prompts, [[0]] * len(prompts))])
    q = np.stack([answer_probs(row, lm.digit_ids) for row in first])
    p = ref.answer_p
    out["answer_kl"] = float(np.mean((p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(-1)))
    valid = np.array([[d in {a[0] for a in it.answers} for d in DIGITS] + [False] for it in items])  # sort: 1st digit
    out["valid_mass"] = float((q * valid).sum(-1).mean())
    conf = np.exp(first.max(-1))
    pick = first.argmax(-1)
    correct = np.array(
        [int(t) in set(lm.digit_ids[[int(a[0]) for a in it.answers]]) for t, it in zip(pick, items, strict=True)]
    )
    out["ece"] = ece(conf[single], correct[single].astype(float))
    return {k: float(v) for k, v in out.items()}
