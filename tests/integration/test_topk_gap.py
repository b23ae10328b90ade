"""The top-k approximation on peaked distributions of a trained model (bench/topk.py measures it):
the gap between the top-k + tail loss and the full-vocabulary one shrinks monotonically as k grows
and vanishes at k = V; the gradient's error vanishes at k = V; and the engine's float32 loss and
gradient are the exact (float64) ones of the coarsened distributions at every k."""

from __future__ import annotations

from itertools import pairwise

import pytest

from bench import topk

FP32 = 5e-4  # relative: the student's tail mass is 1 - support mass in float32 (floored at 1e-6)


@pytest.fixture(scope="session")
def logits(tmp_path_factory, models_root):
    """Teacher/student logits at the response positions of 48 task questions; the pair is trained
    here in seconds (one layer, 40 steps) over the demo tokenizer."""
    pair = topk.tiny_pair(
        tmp_path_factory.mktemp("topk"), say=lambda _: None, steps=40, tokenizer_dir=models_root / "teacher"
    )
    return topk.response_logits(*pair, n_items=48, seed=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_the_top_k_gap_shrinks_with_k_and_vanishes_at_full_width(logits, temperature):
    t_logits, s_logits = logits
    v = t_logits.shape[1]
    rows = topk.measure(t_logits, s_logits, (8, 16, 64, v), temperature)
    mass = [r["teacher_mass"] for r in rows]
    assert mass[0] > 0.6, f"top-8 holds {mass[0]:.2f} of the teacher's mass: not a peaked, teacher-like distribution"
    assert mass == sorted(mass) and mass[-1] == pytest.approx(1.0, abs=1e-5)

    exact = [r["exact_gap"] for r in rows]  # the approximation itself: a lower bound tightening with k
    assert exact[0] > exact[1] > exact[2] > 0 and abs(exact[3]) < 1e-9, exact
    gap = [r["loss_gap"] for r in rows]  # what the engine computes
    assert all(a >= b - FP32 for a, b in pairwise(gap)) and gap[0] > gap[2] + 10 * FP32, gap
    assert abs(gap[3]) < 1e-4, gap  # k = V: the dense loss
    assert all(abs(r["fp32_loss_excess"]) < 2 * FP32 and r["fp32_grad_err"] < 2 * FP32 for r in rows), rows

    err = [r["grad_rel_err"] for r in rows]
    assert err[0] == max(err) and err[3] < 1e-4 and rows[3]["grad_cos"] > 1 - 1e-7, err
