"""The teacher's sampler against a known distribution: 40,000 seeded draws per setting must pass a
chi-square test against the exact temperature / top-k / top-p distribution (numpy reference), and
no draw may ever land on an embedding padding row, however likely the model makes it."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from kd_worker.engine.teacher import make_sampler

N_VOCAB, PAD_ROWS, DRAWS = 40, 8, 40_000


def model_logprobs() -> np.ndarray:
    """One row over N_VOCAB real tokens + PAD_ROWS padding rows the model rates far above them."""
    z = np.linspace(3.0, -3.0, N_VOCAB) + np.random.default_rng(0).normal(0, 0.3, N_VOCAB)
    row = np.concatenate([z, np.full(PAD_ROWS, 20.0)])
    return (row - np.log(np.exp(row - row.max()).sum()) - row.max()).astype(np.float32)


def expected(logprobs: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution the sampler promises, computed directly in float64."""
    z = logprobs[:N_VOCAB].astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = order[: top_k or N_VOCAB]
    p = np.exp(z[keep] - z[keep].max())
    p /= p.sum()
    if top_p < 1.0:
        inside = (np.cumsum(p) - p) < top_p  # the smallest head whose mass reaches top_p
        keep, p = keep[inside], p[inside] / p[inside].sum()
    out = np.zeros(N_VOCAB + PAD_ROWS)
    out[keep] = p
    return out


def chi2_bound(df: int, z: float = 4.26) -> float:
    """Upper chi-square quantile (Wilson-Hilferty), z = 4.26: a fair sampler fails once in 1e5 runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SETTINGS = [
    pytest.param(1.0, 0, 1.0, id="plain"),
    pytest.param(0.7, 0, 1.0, id="temperature"),
    pytest.param(1.0, 5, 1.0, id="top-k"),
    pytest.param(1.3, 12, 1.0, id="top-k-tempered"),
    pytest.param(1.0, 0, 0.6, id="top-p"),  # no top-k: top-p over a pre-selection of the vocabulary
    pytest.param(0.8, 10, 0.5, id="top-k-and-top-p"),
    pytest.param(1.0, N_VOCAB + PAD_ROWS, 0.7, id="top-k-past-the-vocabulary"),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_draws_follow_the_promised_distribution(temperature, top_k, top_p):
    logprobs = model_logprobs()
    sample = make_sampler(temperature, top_k, top_p, N_VOCAB)
    mx.random.seed(1234)
    draws = np.array(sample(mx.array(np.tile(logprobs, (DRAWS, 1)))))
    counts = np.bincount(draws, minlength=N_VOCAB + PAD_ROWS)
    assert counts[N_VOCAB:].sum() == 0, "a padding row was sampled"
    want = expected(logprobs, temperature, top_k, top_p)
    assert counts[want == 0].sum() == 0, (
        f"tokens outside the top-k/top-p set drawn: {np.flatnonzero(counts * (want == 0))}"
    )
    live = want * DRAWS >= 5  # chi-square needs >= 5 expected per cell; pool the rare ones
    obs = np.append(counts[live], counts[~live & (want > 0)].sum())
    exp = np.append(want[live], want[~live & (want > 0)].sum()) * DRAWS
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_bound(len(obs) - 1), f"chi-square {stat:.1f} over {len(obs) - 1} degrees of freedom"


def test_greedy_never_picks_padding():
    logprobs = model_logprobs()
    assert logprobs.argmax() >= N_VOCAB  # the model's favourite is a padding row
    draws = np.array(make_sampler(0.0, 0, 1.0, N_VOCAB)(mx.array(logprobs[None])))
    assert draws.tolist() == [int(logprobs[:N_VOCAB].argmax())]


def test_the_reference_distributions_differ():
    """The settings above are distinguishable, so a sampler ignoring one of them fails its case."""
    lp = model_logprobs()
    dists = [expected(lp, *p.values) for p in SETTINGS]
    for i in range(len(dists)):
        for j in range(i + 1, len(dists)):
            assert np.abs(dists[i] - dists[j]).sum() > 0.05, (SETTINGS[i].id, SETTINGS[j].id)
