"""KD losses over sparse teacher targets: pure functions over MLX arrays, float32.

A teacher target per response position is its top-k support (ids [N, K], log-probs at T=1
[N, K]), the log of the mass outside the support (`tail` [N], -inf when the support is the
whole vocabulary) and `lse_t` [N] = logsumexp(log p / T) over the *full* vocabulary, which makes
tempering exact on the support: log p_T(i) = log p(i) / T - lse_t. Divergences run over the
support plus one tail bucket (teacher tail vs student mass outside the support): the KL of the
coarsened distributions, a lower bound of the full KL that equals it when k = V.
Invalid support slots (padding) carry log-prob -inf and count for neither side.

Shapes: N response positions, K support size, V vocabulary.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import mlx.core as mx

NEG_INF = float("-inf")
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class Targets(NamedTuple):
    ids: mx.array  # [N, K] int32 token ids (support), sorted by teacher probability
    logp: mx.array  # [N, K] float32 teacher log-probs at T=1; -inf marks padding slots
    tail: mx.array  # [N] float32 log teacher mass outside the support (T=1); -inf: none
    lse_t: mx.array  # [N] float32 logsumexp(log p / T) over the full vocabulary (0 at T=1)
    labels: mx.array  # [N] int32 the response tokens (hard labels)
    kd_mask: mx.array  # [N] float32 1 where a teacher distribution applies (0: CE only)


class LossSums(NamedTuple):
    kd: mx.array  # sum over kd positions of the divergence at temperature T
    ce: mx.array  # sum over positions of the CE at T=1
    kd_n: mx.array  # number of kd positions
    n: mx.array  # number of positions
    uld: mx.array | float = 0.0  # sum over ULD positions (cross-tokenizer, unaligned) of `uld_distance`
    uld_n: mx.array | float = 0.0  # number of ULD positions


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return mx.where(x > -0.6931472, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def _mask_invalid(logp: mx.array, valid: mx.array) -> mx.array:
    return mx.where(valid, logp, NEG_INF)


def teacher_tempered(logp: mx.array, tail: mx.array, lse_t: mx.array, temperature: float) -> tuple[mx.array, mx.array]:
    """Teacher log-probs [N, K] and tail log-mass [N] at temperature T, exact on the support."""
    if temperature == 1.0:
        return logp, tail
    lp = logp / temperature - lse_t[:, None]
    support = mx.logsumexp(lp, axis=-1)
    lt = log1mexp(mx.minimum(support, -1e-7))
    return lp, mx.where(tail == NEG_INF, NEG_INF, lt)


def student_bucketed(
    logits: mx.array, ids: mx.array, valid: mx.array, temperature: float, lse: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Student log-probs on the support [N, K] and its log-mass outside the support [N]."""
    z = logits if temperature == 1.0 else logits / temperature
    if lse is None:
        lse = mx.logsumexp(z, axis=-1)
    lq = _mask_invalid(mx.take_along_axis(z, ids, axis=-1) - lse[:, None], valid)
    support = mx.logsumexp(lq, axis=-1)
    return lq, log1mexp(mx.minimum(support, -1e-6))


def _plogp_ratio(la: mx.array, lb: mx.array) -> mx.array:
    """exp(la) * (la - lb), 0 where either side is -inf (callers mask the meaningful cases).
    Inputs are sanitised *before* the arithmetic: `where` alone would still send inf * 0 = NaN
    through the gradient of the branch it discards."""
    off = (la == NEG_INF) | (lb == NEG_INF)
    la_s, lb_s = mx.where(off, 0.0, la), mx.where(off, 0.0, lb)
    return mx.where(off, 0.0, mx.exp(la_s) * (la_s - lb_s))


def forward_kl(lp, tp, lq, tq) -> mx.array:
    """KL(P || Q) per position over support + tail bucket."""
    return _plogp_ratio(lp, lq).sum(axis=-1) + _plogp_ratio(tp, tq)


def reverse_kl(lp, tp, lq, tq, valid) -> mx.array:
    """KL(Q || P) per position; the tail bucket is dropped when the teacher has none (k = V)."""
    lq_v = _mask_invalid(lq, valid)
    body = _plogp_ratio(lq_v, lp).sum(axis=-1)
    return body + mx.where(tp == NEG_INF, 0.0, _plogp_ratio(tq, tp))


def generalized_jsd(lp, tp, lq, tq, valid, beta: float) -> mx.array:
    """beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta P + (1 - beta) Q (GKD)."""
    lb, l1b = mx.log(mx.array(beta)), mx.log(mx.array(1.0 - beta))
    lq_v = _mask_invalid(lq, valid)
    lm = mx.logaddexp(lb + lp, l1b + lq_v)
    tm = mx.logaddexp(lb + tp, l1b + tq)
    tail_on = tp != NEG_INF
    p_part = _plogp_ratio(lp, lm).sum(axis=-1) + _plogp_ratio(tp, tm)
    q_part = _plogp_ratio(lq_v, lm).sum(axis=-1) + mx.where(tail_on, _plogp_ratio(tq, tm), 0.0)
    return beta * p_part + (1.0 - beta) * q_part


def divergence(kind: Divergence, lp, tp, lq, tq, valid, beta: float = 0.5) -> mx.array:
    if kind == "forward_kl":
        return forward_kl(lp, tp, lq, tq)
    if kind == "reverse_kl":
        return reverse_kl(lp, tp, lq, tq, valid)
    return generalized_jsd(lp, tp, lq, tq, valid, beta)


def loss_sums(
    logits: mx.array, t: Targets, temperature: float, kind: Divergence = "forward_kl", beta: float = 0.5
) -> LossSums:
    """Sums (not means) so chunks and batches add up exactly; normalise once per batch."""
    logits = logits.astype(mx.float32)
    valid = t.logp != NEG_INF
    lse1 = mx.logsumexp(logits, axis=-1)  # shared by CE and, at T=1, by the KD term
    ce = lse1 - mx.take_along_axis(logits, t.labels[:, None], axis=-1).squeeze(-1)
    lq, tq = student_bucketed(logits, t.ids, valid, temperature, lse1 if temperature == 1.0 else None)
    lp, tp = teacher_tempered(t.logp, t.tail, t.lse_t, temperature)
    d = divergence(kind, lp, tp, lq, tq, valid, beta)
    return LossSums(kd=(d * t.kd_mask).sum(), ce=ce.sum(), kd_n=t.kd_mask.sum(), n=mx.array(ce.shape[0], mx.float32))


def combine(s: LossSums, temperature: float, alpha: float, uld_weight: float = 1.0) -> mx.array:
    """alpha * T^2 * KD + (1 - alpha) * CE, each normalised per (kd / all) response token of the batch.
    T^2 keeps the soft-target gradients on the CE's scale as T changes (Hinton et al. 2015).
    Cross-tokenizer ULD positions join the KD term, each counted as one teacher-guided token."""
    kd = (temperature * temperature * s.kd + uld_weight * s.uld) / mx.maximum(s.kd_n + s.uld_n, 1.0)
    ce = s.ce / mx.maximum(s.n, 1.0)
    return alpha * kd + (1.0 - alpha) * ce


def uld_distance(logits: mx.array, logp: mx.array, lse_t: mx.array, temperature: float) -> mx.array:
    """Universal Logit Distillation (Boizard et al. 2024) per position [M]: L1 between the teacher's and
    the student's probabilities sorted in decreasing order, so no token id is compared. Truncated to
    the teacher's K support slots plus one bucket for the mass beyond them; equals the full sorted
    L1 when K = V. The student side is a top-K (no full-vocabulary sort), rows gathered by the caller."""
    k = min(logp.shape[-1], logits.shape[-1])
    z = logits.astype(mx.float32) if temperature == 1.0 else logits.astype(mx.float32) / temperature
    top = -mx.sort(-mx.topk(z, k, axis=-1), axis=-1)  # [M, k] decreasing
    q = mx.exp(top - mx.logsumexp(z, axis=-1, keepdims=True))
    lp = logp[:, :k] if temperature == 1.0 else logp[:, :k] / temperature - lse_t[:, None]
    p = mx.exp(lp)  # exp(-inf) = 0 on padding slots; no gradient flows to the teacher
    return mx.abs(p - q).sum(axis=-1) + mx.abs(p.sum(axis=-1) - q.sum(axis=-1))


def validation_sums(
    logits: mx.array, t: Targets, temperature: float, kind: Divergence = "forward_kl", beta: float = 0.5
) -> tuple[mx.array, ...]:
    """`loss_sums` and `agreement_sums` of the same logits in one pass (kd, ce, kd_n, n, kl, top1):
    one log-sum-exp at T=1 serves CE, the KL at T=1 and, at T=1, the KD term."""
    logits = logits.astype(mx.float32)
    valid = t.logp != NEG_INF
    lse1 = mx.logsumexp(logits, axis=-1)
    ce = lse1 - mx.take_along_axis(logits, t.labels[:, None], axis=-1).squeeze(-1)
    lq1, tq1 = student_bucketed(logits, t.ids, valid, 1.0, lse1)
    kl = (forward_kl(t.logp, t.tail, lq1, tq1) * t.kd_mask).sum()
    lq, tq = (lq1, tq1) if temperature == 1.0 else student_bucketed(logits, t.ids, valid, temperature)
    lp, tp = teacher_tempered(t.logp, t.tail, t.lse_t, temperature)
    d = divergence(kind, lp, tp, lq, tq, valid, beta)
    top1 = ((mx.argmax(logits, axis=-1) == t.ids[:, 0]) * t.kd_mask).sum()
    n = mx.array(ce.shape[0], mx.float32)
    return (d * t.kd_mask).sum(), ce.sum(), t.kd_mask.sum(), n, kl, top1


def agreement_sums(logits: mx.array, t: Targets) -> tuple[mx.array, mx.array]:
    """(forward KL at T=1 summed over kd positions, top-1 agreements with the teacher)."""
    valid = t.logp != NEG_INF
    lq, tq = student_bucketed(logits.astype(mx.float32), t.ids, valid, 1.0)
    kl = (forward_kl(t.logp, t.tail, lq, tq) * t.kd_mask).sum()
    top1 = ((mx.argmax(logits, axis=-1) == t.ids[:, 0]) * t.kd_mask).sum()
    return kl, top1


def _tempered_exp(shifted: mx.array, e: mx.array, temperature: float) -> mx.array:
    """exp(shifted / T) from e = exp(shifted): a sqrt instead of a second exp at T=2 (the default);
    exp over a 152k-wide row is the CPU's most expensive pass, sqrt is ~4x cheaper."""
    if temperature == 1.0:
        return e
    if temperature == 2.0:
        return mx.sqrt(e)
    return mx.exp(shifted / temperature)


def forward_kl_ce_grad(
    logits: mx.array, t: Targets, temperature: float, kd_weight: mx.array, ce_weight: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """Forward KL (support + tail bucket, at T) and CE per position, and d(loss)/d(logits) in closed
    form for loss = kd_weight * sum(KL * kd_mask) + ce_weight * sum(CE). One exp over the vocabulary
    (plus a sqrt at T=2) serves both terms and the gradient; autodiff would redo them backwards.

    d KL_T / dz_j = (r_j - target_j) / T, with r the student's tempered softmax and target_j = p_j
    on the support, p_tail * r_j / r_tail outside it (the teacher's tail spread like the student's).
    """
    z = logits.astype(mx.float32)
    n, v = z.shape
    m = mx.stop_gradient(z.max(axis=-1, keepdims=True))
    z_label = mx.take_along_axis(z, t.labels[:, None], axis=-1).squeeze(-1)
    shifted = z - m
    e = mx.exp(shifted)
    s1 = e.sum(axis=-1, keepdims=True)
    ce = (m + mx.log(s1)).squeeze(-1) - z_label
    # [rows, V] arrays kept to a minimum: e and e_t; the softmax at T is e_t / s_t inside the
    # gradient expression, never an array of its own (the fused step's working set, see objective)
    e_t = _tempered_exp(shifted, e, temperature)
    s_t = e_t.sum(axis=-1, keepdims=True)
    valid = t.logp != NEG_INF
    r_s = mx.where(valid, mx.take_along_axis(e_t, t.ids, axis=-1) / s_t, 0.0)
    lq = mx.where(valid, mx.log(mx.maximum(r_s, 1e-38)), NEG_INF)
    r_tail = mx.maximum(1.0 - r_s.sum(axis=-1), 1e-6)
    lp, tp = teacher_tempered(t.logp, t.tail, t.lse_t, temperature)
    kl = forward_kl(lp, tp, lq, mx.log(r_tail))
    p_tail = mx.where(tp == NEG_INF, 0.0, mx.exp(tp))
    kd_w = kd_weight * t.kd_mask / temperature  # [N]
    coef = 1.0 - p_tail / r_tail  # outside the support: r_j * coef = r_j - p_tail r_j / r_tail
    grad = e_t * (kd_w * coef)[:, None] / s_t + e * (ce_weight / s1)
    on_support = mx.where(valid, (1.0 - coef)[:, None] * r_s - mx.where(valid, mx.exp(lp), 0.0), 0.0) * kd_w[:, None]
    rows = mx.arange(n, dtype=mx.int32)[:, None] * v
    # one scatter for the support and label corrections (each scatter copies the [rows, V] gradient)
    at = mx.concatenate([(rows + t.ids).reshape(-1), rows[:, 0] + t.labels])
    grad = grad.reshape(-1).at[at].add(mx.concatenate([on_support.reshape(-1), -ce_weight * mx.ones((n,))]))
    return kl, ce, grad.reshape(n, v)
