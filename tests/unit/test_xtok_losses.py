"""The ULD term for unaligned cross-tokenizer positions against a dense numpy reference, and how
it joins the KD term and the batches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_losses import np_log_softmax

from kd_worker.engine import losses as L
from kd_worker.engine.data import SoftTargets, StudentSequence, collate


def teacher_rows(t_logits: np.ndarray, k: int, temperature: float) -> tuple[mx.array, mx.array]:
    """Sorted top-k T=1 log-probs and lse at T, as kd_worker.engine.teacher stores them."""
    lp = np_log_softmax(t_logits.astype(np.float64))
    top = -np.sort(-lp, axis=-1)[:, :k]
    lse_t = np.log(np.exp(lp / temperature).sum(-1))
    return mx.array(top.astype(np.float32)), mx.array(lse_t.astype(np.float32))


def dense_uld(t_logits, s_logits, temperature):
    """Boizard et al.: L1 between the sorted probability vectors, the shorter one zero-padded."""
    p = -np.sort(-np.exp(np_log_softmax(t_logits.astype(np.float64) / temperature)), axis=-1)
    q = -np.sort(-np.exp(np_log_softmax(s_logits.astype(np.float64) / temperature)), axis=-1)
    width = max(p.shape[1], q.shape[1])
    p = np.pad(p, ((0, 0), (0, width - p.shape[1])))
    q = np.pad(q, ((0, 0), (0, width - q.shape[1])))
    return np.abs(p - q).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_uld_equals_the_dense_sorted_l1(temperature):
    rng = np.random.default_rng(0)
    n, vt, vs = 10, 37, 53  # different vocabularies: ULD compares no ids
    t, s = rng.normal(0, 2, (n, vt)), rng.normal(0, 2, (n, vs))
    logp, lse_t = teacher_rows(t, vt, temperature)
    got = np.array(L.uld_distance(mx.array(s.astype(np.float32)), logp, lse_t, temperature))
    np.testing.assert_allclose(got, dense_uld(t, s, temperature), rtol=2e-5, atol=2e-6)


def test_truncated_uld_is_a_lower_bound_and_zero_for_equal_distributions():
    rng = np.random.default_rng(1)
    n, v, k = 12, 80, 8
    t, s = rng.normal(0, 2, (n, v)), rng.normal(0, 2, (n, v))
    logp, lse_t = teacher_rows(t, k, 2.0)
    got = np.array(L.uld_distance(mx.array(s.astype(np.float32)), logp, lse_t, 2.0))
    full = dense_uld(t, s, 2.0)
    assert (got >= 0).all() and (got <= full + 1e-5).all() and (got < full - 1e-3).any()
    same = np.array(L.uld_distance(mx.array(t[:, rng.permutation(v)].astype(np.float32)), logp, lse_t, 2.0))
    assert np.abs(same).max() < 1e-5  # a permuted vocabulary is the same distribution to ULD


def test_uld_gradient_is_finite_and_moves_the_student():
    rng = np.random.default_rng(2)
    t, s = rng.normal(0, 8, (6, 40)), rng.normal(0, 8, (6, 40))
    logp, lse_t = teacher_rows(t, 8, 2.0)
    padded = mx.concatenate([logp, mx.full((6, 2), L.NEG_INF)], axis=1)  # support padding slots
    g = mx.grad(lambda z: L.uld_distance(z, padded, lse_t, 2.0).sum())(mx.array(s.astype(np.float32)))
    g = np.array(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_combine_counts_uld_positions_as_teacher_guided_tokens():
    s = L.LossSums(
        kd=mx.array(3.0), ce=mx.array(10.0), kd_n=mx.array(4.0), n=mx.array(8.0), uld=mx.array(2.0), uld_n=mx.array(2.0)
    )
    t, a, w = 2.0, 0.7, 0.5
    want = a * (t * t * 3.0 + w * 2.0) / 6.0 + (1 - a) * 10.0 / 8.0
    assert L.combine(s, t, a, w).item() == pytest.approx(want)
    plain = L.LossSums(*s[:4])  # same-vocabulary runs: no ULD, the formula is unchanged
    assert L.combine(plain, t, a).item() == pytest.approx(a * t * t * 3.0 / 4.0 + (1 - a) * 10.0 / 8.0)


def test_collate_concatenates_uld_masks_and_fills_missing_ones():
    def seq(n, uld):
        t = SoftTargets(
            np.zeros((n, 2), np.int32),
            np.zeros((n, 2), np.float32),
            np.zeros(n, np.float32),
            np.zeros(n, np.float32),
            np.ones(n, np.float32),
            uld,
        )
        return StudentSequence(np.arange(n + 2, dtype=np.int32), 2, t)

    b = collate([seq(3, np.array([0, 1, 1], np.float32)), seq(2, None)])
    assert b.targets.uld_mask.tolist() == [0, 1, 1, 0, 0]
