"""`teacher.targets_from_logits` at its edges, against float64 numpy: k = V is the dense
distribution, every temperature branch (1, 2 and any other), the tail floor when the top-k hold
nearly all the mass (finite, and the losses over it too)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kd_worker.engine.losses import Targets, loss_sums
from kd_worker.engine.teacher import TAIL_FLOOR, targets_from_logits


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def teacher_logits(n: int = 6, v: int = 300, seed: int = 0) -> np.ndarray:
    """Peaked rows like a trained teacher's: a few large logits over a spread of small ones."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, v))
    z[np.arange(n), rng.integers(0, v, n)] += 8
    return z.astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5, 1.5, 3.0])
def test_top_k_at_full_width_is_the_dense_distribution(temperature):
    z = teacher_logits()
    v = z.shape[1]
    ids, logp, tail, lse_t = targets_from_logits(z.copy(), v, temperature)
    ref = log_softmax(z)
    assert ids.shape == (len(z), v) and all(sorted(r) == list(range(v)) for r in ids.tolist())
    np.testing.assert_allclose(logp, np.take_along_axis(ref, ids, -1), atol=2e-5)
    assert (np.diff(logp, axis=-1) <= 0).all()  # sorted by teacher probability
    assert np.isneginf(tail).all()  # no mass outside a full support
    np.testing.assert_allclose(lse_t, logsumexp(ref / temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 4.0])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_top_k_support_tail_and_tempered_lse_match_the_reference(k, temperature):
    z = teacher_logits(seed=k)
    ids, logp, tail, lse_t = targets_from_logits(z.copy(), k, temperature)
    ref = log_softmax(z)
    want_ids = np.argsort(-ref, -1, kind="stable")[:, :k]
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(logp, np.take_along_axis(ref, want_ids, -1), atol=2e-5)
    rest = np.exp(ref).sum(-1) - np.exp(np.take_along_axis(ref, want_ids, -1)).sum(-1)
    np.testing.assert_allclose(np.exp(tail), rest, atol=1e-6)  # the mass, to fp32 resolution of the total
    np.testing.assert_allclose(lse_t, logsumexp(ref / temperature), rtol=1e-5, atol=1e-5)


def test_the_tail_is_floored_when_the_support_holds_nearly_all_the_mass():
    z = np.full((4, 500), -80.0, np.float32)  # outside the top 8: ~1e-32 of the mass, below fp32 resolution
    z[:, :8] = np.linspace(0, 1, 8)
    z[1, 8:] = -12.0  # a small tail fp32 still resolves (~4e-4 of the mass)
    z[2, :8] = [30, 0, 0, 0, 0, 0, 0, 0]  # one token holds everything: the rest rounds to 0 or below
    ids, logp, tail, lse_t = targets_from_logits(z.copy(), 8, 2.0)
    assert np.isfinite(tail).all() and np.isfinite(lse_t).all() and np.isfinite(logp).all()
    floor = np.log(TAIL_FLOOR)
    assert tail[0] == pytest.approx(floor, abs=1e-3) and tail[2] == pytest.approx(floor, abs=1e-3)
    true_tail = np.log(np.exp(log_softmax(z[1:2]))[0, 8:].sum())
    assert tail[1] == pytest.approx(true_tail, abs=1e-3) and tail[1] > floor
    # the training loss over such targets stays finite (a -inf or NaN tail would poison a whole batch)
    t = Targets(
        mx.array(ids),
        mx.array(logp),
        mx.array(tail),
        mx.array(lse_t),
        mx.array(ids[:, 0]),
        mx.ones((4,)),
    )
    student = mx.array(np.random.default_rng(0).normal(size=(4, 500)).astype(np.float32))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        s = loss_sums(student, t, 2.0, kind)
        assert np.isfinite(s.kd.item()) and s.kd.item() > 0, kind
