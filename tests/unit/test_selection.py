"""Best-checkpoint selection, patience and the on-policy schedule: pure functions of the validation
history and the step (issue 16)."""

from __future__ import annotations

import math

import pytest

from jobs.config import KDConfig, resolve_config
from jobs.errors import ConfigError
from kd_worker.engine.hooks import Stop, raise_for_stop
from kd_worker.engine.onpolicy import is_on_policy, rollout_share
from kd_worker.engine.selection import Patience, choose, schedule, validations_without_improvement

VAL = [
    {"step": 0, "kl": 0.05},  # the untrained student: never selected, never the bar
    {"step": 10, "kl": 0.30},
    {"step": 20, "kl": 0.20},
    {"step": 30, "kl": 0.25},
    {"step": 40, "kl": 0.20},  # ties the best: the earlier step wins
    {"step": 50, "kl": 0.22},
]


def test_best_is_the_lowest_held_out_kl_after_step_0_earliest_on_a_tie():
    chosen = choose(VAL, "best", 50)
    assert (chosen.step, chosen.by, chosen.val_kl) == (20, "val_kl", 0.20)
    assert chosen.doc() == {"step": 20, "by": "val_kl", "val_kl": 0.20}


def test_last_is_the_last_step_with_its_kl_and_best_without_held_out_data_falls_back_to_last():
    assert choose(VAL, "last", 50).doc() == {"step": 50, "by": "last", "val_kl": 0.22}
    assert choose([{"step": 0}], "best", 7).doc() == {"step": 7, "by": "last", "val_kl": None}


def test_patience_counts_validations_since_the_best_and_stops_as_converged():
    assert validations_without_improvement(VAL[:3]) == 0
    assert validations_without_improvement(VAL) == 3  # 30, 40 (a tie is no improvement), 50
    hook = Patience(3, VAL[:4])  # primed with a resumed run's history: 1 so far
    assert hook.should_stop() is None
    hook.on_eval(40, {"kl": 0.20})
    assert hook.should_stop() is None
    hook.on_eval(50, {"kl": 0.22})
    stop = hook.should_stop()
    assert stop is not None and stop.kind == "converged" and "patience=3" in stop.detail
    hook.on_eval(60, {"kl": 0.10})  # a better one resets the count
    assert hook.should_stop() is None
    assert Patience(0, VAL).should_stop() is None  # 0: never


def test_converged_is_no_error_outside_the_loop():
    raise_for_stop(Stop("converged", "x"), "during validation", "")  # validation, gate: carry on


@pytest.mark.parametrize(("save_every", "val_every", "want"), [(100, 50, 50), (30, 4, 4), (5, 15, 5), (4, 6, 2)])
def test_select_best_checkpoints_at_every_validation(save_every, val_every, want):
    cfg = KDConfig(select="best", save_every=save_every, val_every=val_every, iterations=60)
    every = schedule(cfg).save_every
    assert every == want and val_every % every == 0
    assert schedule(cfg.model_copy(update={"select": "last"})).save_every == save_every  # unchanged


@pytest.mark.parametrize("share", [0.0, 0.25, 0.3, 0.5, 2 / 3, 1.0])
def test_on_policy_schedule_holds_the_exact_share_in_every_prefix(share):
    on = [is_on_policy(s, share) for s in range(60)]
    for n in range(1, 61):
        assert sum(on[:n]) == math.floor(n * share)
        assert rollout_share(n - 1, share) == math.floor(n * share) / n
    if share == 0.5:
        assert on[:4] == [False, True, False, True]  # interleaved, not a block


def test_on_policy_settings_are_validated():
    with pytest.raises(ConfigError, match="on_policy"):
        resolve_config({"on_policy": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'select'"):
        resolve_config({"selct": "best"})
    cfg = resolve_config({})
    assert (cfg.on_policy, cfg.select, cfg.patience, cfg.on_policy_divergence, cfg.on_policy_alpha) == (
        0.0,
        "last",
        0,
        "forward_kl",
        1.0,
    )
