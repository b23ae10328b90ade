"""The closed-form forward-KL + CE gradient equals autodiff of the reference loss."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_losses import sparse_targets

from kd_worker.engine import losses as L


def autodiff(logits, t, temperature, alpha):
    def f(z):
        return L.combine(L.loss_sums(z, t, temperature, "forward_kl"), temperature, alpha)

    return mx.value_and_grad(f)(logits)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("k", [4, 16, 40])
def test_closed_form_matches_autodiff(temperature, k):
    rng = np.random.default_rng(k)
    n, v, alpha = 12, 40, 0.7
    tl, sl = rng.normal(0, 3, (n, v)), rng.normal(0, 3, (n, v)).astype(np.float32)
    mask = (rng.random(n) > 0.3).astype(np.float32)
    t = sparse_targets(tl, k, temperature, rng.integers(0, v, n), mask)
    if k == 16:  # padding slots repeating a real id count for neither side
        pad_ids = mx.concatenate([t.ids, mx.repeat(t.ids[:, :1], 3, axis=1)], axis=1)
        t = t._replace(ids=pad_ids, logp=mx.concatenate([t.logp, mx.full((n, 3), L.NEG_INF)], axis=1))
    z = mx.array(sl)
    want_v, want_g = autodiff(z, t, temperature, alpha)
    kd_w = alpha * temperature**2 / max(mask.sum(), 1)
    ce_w = (1 - alpha) / n
    kl, ce, grad = L.forward_kl_ce_grad(z, t, temperature, mx.array(kd_w), mx.array(ce_w))
    got_v = kd_w * (kl * t.kd_mask).sum() + ce_w * ce.sum()
    assert got_v.item() == pytest.approx(want_v.item(), rel=1e-4)
    np.testing.assert_allclose(np.array(grad), np.array(want_g), rtol=2e-3, atol=2e-6)
