"""The publish gate's decision from its two comparisons (engine.gate.verdict): forgetting on the
regression set rejects even when the new data improved; the regression set gets an absolute slack
on top of the relative tolerance, the job's own held-out split does not."""

from __future__ import annotations

from kd_worker.engine.gate import verdict, worse


def cmp(candidate: float, published: float, n: int = 10) -> dict:
    return {
        "examples": n,
        "candidate_kl": candidate,
        "published_kl": published,
        "candidate_ce": 0.0,
        "published_ce": 0.0,
    }


def test_forgetting_is_rejected_even_when_the_new_data_improved():
    decision, reason = verdict(cmp(0.01, 0.40), cmp(0.70, 0.01), version=3, tolerance=0.01, slack=0.02)
    assert decision == "reject"
    assert reason.startswith("forgets earlier jobs: KL on the regression set (10 examples")
    assert "0.7000 vs 0.0100" in reason and "published v3" in reason and "although better" in reason


def test_the_regression_slack_absorbs_drift_near_zero_but_not_forgetting():
    drift = cmp(0.0113, 0.0096)  # +18% relative, +0.0017 nats/token: a warm, replayed job (bench)
    assert worse(drift, 0.01) and not worse(drift, 0.01, slack=0.02)
    assert verdict(cmp(0.01, 0.30), drift, 2, 0.01, 0.02) == (
        "publish",
        "not worse than the published version (held-out and regression set)",
    )
    assert verdict(cmp(0.01, 0.30), cmp(0.0410, 0.02), 2, 0.01, 0.02)[0] == "reject"  # 0.041 > 0.0202 + 0.02


def test_the_held_out_split_has_no_slack_and_empty_sets_never_reject():
    decision, reason = verdict(cmp(0.0115, 0.0100), {}, 1, 0.01, 0.02)
    assert decision == "reject" and reason.startswith("higher held-out KL than the published v1: 0.0115 vs 0.0100")
    assert verdict({}, {}, 1, 0.01, 0.02) == ("publish", "not worse than the published version")
    assert verdict(cmp(0.0100, 0.0100), {}, 1, 0.0, 0.0)[0] == "publish"  # equal is not worse
