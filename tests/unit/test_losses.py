"""KD losses against an independent dense numpy reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kd_worker.engine import losses as L


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def sparse_targets(t_logits: np.ndarray, k: int, temperature: float, labels: np.ndarray, kd_mask=None) -> L.Targets:
    """Top-k targets the way the teacher stores them, computed in float64 numpy."""
    logp = np_log_softmax(t_logits.astype(np.float64))
    ids = np.argsort(-logp, axis=-1)[:, :k]
    top = np.take_along_axis(logp, ids, -1)
    rest = np.ones_like(logp, dtype=bool)
    np.put_along_axis(rest, ids, False, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.where(rest, np.exp(logp), 0.0).sum(-1))
    z = logp / temperature
    lse_t = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    n = t_logits.shape[0]
    return L.Targets(
        ids=mx.array(ids.astype(np.int32)),
        logp=mx.array(top.astype(np.float32)),
        tail=mx.array(tail.astype(np.float32)),
        lse_t=mx.array(lse_t.astype(np.float32)),
        labels=mx.array(labels.astype(np.int32)),
        kd_mask=mx.array(np.ones(n, np.float32) if kd_mask is None else kd_mask.astype(np.float32)),
    )


def dense_reference(t, s, labels, temperature, alpha, kind="forward_kl", beta=0.5, kd_mask=None):
    lp = np_log_softmax(t.astype(np.float64) / temperature)
    lq = np_log_softmax(s.astype(np.float64) / temperature)
    p, q = np.exp(lp), np.exp(lq)
    if kind == "forward_kl":
        d = (p * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (lq - lp)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (lp - np.log(m))).sum(-1) + (1 - beta) * (q * (lq - np.log(m))).sum(-1)
    mask = np.ones(len(d)) if kd_mask is None else kd_mask
    ce = -np.take_along_axis(np_log_softmax(s.astype(np.float64)), labels[:, None], -1)[:, 0]
    return alpha * temperature**2 * (d * mask).sum() / max(mask.sum(), 1) + (1 - alpha) * ce.mean()


def bucketed_reference(t, s, labels, k, temperature, alpha):
    """Forward KL over the teacher's top-k support plus one tail bucket, float64."""
    lp1 = np_log_softmax(t.astype(np.float64))
    ids = np.argsort(-lp1, -1)[:, :k]
    lp = np_log_softmax(t.astype(np.float64) / temperature)
    lq = np_log_softmax(s.astype(np.float64) / temperature)
    ps, qs = np.take_along_axis(np.exp(lp), ids, -1), np.take_along_axis(np.exp(lq), ids, -1)
    pt, qt = 1 - ps.sum(-1), 1 - qs.sum(-1)
    d = (ps * (np.log(ps) - np.log(qs))).sum(-1) + pt * (np.log(pt) - np.log(qt))
    ce = -np.take_along_axis(np_log_softmax(s.astype(np.float64)), labels[:, None], -1)[:, 0]
    return alpha * temperature**2 * d.mean() + (1 - alpha) * ce.mean()


def total(logits, targets, temperature, alpha, kind="forward_kl", beta=0.5):
    return L.combine(L.loss_sums(mx.array(logits), targets, temperature, kind, beta), temperature, alpha).item()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_full_support_equals_dense_formula(rng, temperature, kind):
    n, v = 24, 97
    t, s = rng.normal(0, 3, (n, v)), rng.normal(0, 3, (n, v))
    labels = rng.integers(0, v, n)
    targets = sparse_targets(t, v, temperature, labels)
    got = total(s.astype(np.float32), targets, temperature, 0.7, kind, beta=0.3)
    want = dense_reference(t, s, labels, temperature, 0.7, kind, beta=0.3)
    assert got == pytest.approx(want, rel=2e-5, abs=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_equals_bucketed_reference(rng, temperature):
    n, v, k = 16, 211, 8
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    labels = rng.integers(0, v, n)
    got = total(s.astype(np.float32), sparse_targets(t, k, temperature, labels), temperature, 0.7)
    assert got == pytest.approx(bucketed_reference(t, s, labels, k, temperature, 0.7), rel=1e-4)


def test_top_k_is_a_lower_bound_of_the_full_kl(rng):
    n, v = 16, 211
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    labels = rng.integers(0, v, n)
    full = total(s.astype(np.float32), sparse_targets(t, v, 2.0, labels), 2.0, 1.0)
    sparse = total(s.astype(np.float32), sparse_targets(t, 16, 2.0, labels), 2.0, 1.0)
    assert 0 < sparse < full


@pytest.mark.parametrize("k", [5, 50])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_divergence_when_student_equals_teacher(rng, k, kind):
    n, v = 12, 50
    t = rng.normal(0, 3, (n, v))
    targets = sparse_targets(t, k, 2.0, rng.integers(0, v, n))
    sums = L.loss_sums(mx.array(t.astype(np.float32)), targets, 2.0, kind)
    assert abs(sums.kd.item()) < 1e-4


def test_alpha_extremes_are_pure_ce_and_pure_kd(rng):
    n, v = 10, 40
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    labels = rng.integers(0, v, n)
    targets = sparse_targets(t, v, 2.0, labels)
    ce = -np.take_along_axis(np_log_softmax(s), labels[:, None], -1).mean()
    assert total(s.astype(np.float32), targets, 2.0, 0.0) == pytest.approx(ce, rel=1e-5)
    assert total(s.astype(np.float32), targets, 2.0, 1.0) == pytest.approx(
        dense_reference(t, s, labels, 2.0, 1.0), rel=1e-5
    )


def test_kd_mask_excludes_positions_and_normalises_over_kd_positions(rng):
    n, v = 20, 30
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    labels = rng.integers(0, v, n)
    mask = (np.arange(n) % 3 == 0).astype(np.float64)
    got = total(s.astype(np.float32), sparse_targets(t, v, 2.0, labels, mask), 2.0, 0.7)
    assert got == pytest.approx(dense_reference(t, s, labels, 2.0, 0.7, kd_mask=mask), rel=2e-5)


def test_padding_slots_count_for_neither_side(rng):
    """A support padded with -inf slots (repeating a real id) equals the unpadded one."""
    n, v, k = 8, 60, 6
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    labels = rng.integers(0, v, n)
    base = sparse_targets(t, k, 2.0, labels)
    pad_ids = mx.concatenate([base.ids, mx.repeat(base.ids[:, :1], 3, axis=1)], axis=1)
    pad_logp = mx.concatenate([base.logp, mx.full((n, 3), L.NEG_INF)], axis=1)
    padded = base._replace(ids=pad_ids, logp=pad_logp)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        a = total(s.astype(np.float32), base, 2.0, 0.7, kind)
        b = total(s.astype(np.float32), padded, 2.0, 0.7, kind)
        assert a == pytest.approx(b, rel=1e-6)


def test_sums_add_up_across_chunks_so_normalisation_is_per_token(rng):
    """Two sequences of different lengths: the batch loss is the per-token mean, not a mean of means."""
    v = 40
    t, s = rng.normal(0, 2, (30, v)), rng.normal(0, 2, (30, v))
    labels = rng.integers(0, v, 30)
    whole = sparse_targets(t, 8, 2.0, labels)
    parts = [
        L.loss_sums(mx.array(s[a:b].astype(np.float32)), L.Targets(*(x[a:b] for x in whole)), 2.0)
        for a, b in ((0, 7), (7, 30))
    ]
    summed = L.LossSums(*(sum(p[i] for p in parts) for i in range(4)))
    assert L.combine(summed, 2.0, 0.7).item() == pytest.approx(total(s.astype(np.float32), whole, 2.0, 0.7), rel=1e-6)
    per_seq_mean = np.mean([L.combine(p, 2.0, 0.7).item() for p in parts])
    assert abs(per_seq_mean - L.combine(summed, 2.0, 0.7).item()) > 1e-3


def test_t_squared_keeps_gradient_scale_across_temperatures(rng):
    """Hinton et al. (2015): for zero-mean logits and large T, dKL_T/dz ~ (z - v) / (N V T^2), so
    T^2 * KL has a temperature-independent gradient."""
    n, v = 6, 64
    t = rng.normal(0, 0.5, (n, v))
    t -= t.mean(-1, keepdims=True)
    s = rng.normal(0, 0.5, (n, v))
    s -= s.mean(-1, keepdims=True)
    labels = rng.integers(0, v, n)

    def grad(temperature, scaled):
        targets = sparse_targets(t, v, temperature, labels)

        def f(z):
            sums = L.loss_sums(z, targets, temperature)
            kd = sums.kd / sums.kd_n
            return kd * temperature**2 if scaled else kd

        return np.array(mx.grad(f)(mx.array(s.astype(np.float32))))

    g8, g16 = grad(8.0, True), grad(16.0, True)
    assert np.linalg.norm(g8 - g16) / np.linalg.norm(g16) < 0.05
    approx = (s - t) / (n * v)
    assert np.linalg.norm(g16 - approx) / np.linalg.norm(approx) < 0.05
    raw8, raw16 = grad(8.0, False), grad(16.0, False)
    assert np.linalg.norm(raw8) / np.linalg.norm(raw16) == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [4, 64])
def test_gradients_are_finite_even_with_peaked_distributions(rng, kind, k):
    n, v = 10, 64
    t = rng.normal(0, 12, (n, v))  # near one-hot teacher: tails underflow
    s = rng.normal(0, 12, (n, v))
    targets = sparse_targets(t, k, 2.0, rng.integers(0, v, n))
    g = mx.grad(lambda z: L.combine(L.loss_sums(z, targets, 2.0, kind), 2.0, 0.7))(mx.array(s.astype(np.float32)))
    assert np.isfinite(np.array(g)).all()


def test_agreement_metrics(rng):
    n, v = 12, 30
    t = rng.normal(0, 2, (n, v))
    targets = sparse_targets(t, 5, 1.0, rng.integers(0, v, n))
    kl, top1 = L.agreement_sums(mx.array(t.astype(np.float32)), targets)
    assert abs(kl.item()) < 1e-4 and top1.item() == n
    kl2, _ = L.agreement_sums(mx.array(-t.astype(np.float32)), targets)
    assert kl2.item() > 1.0
