"""bench/realsize.py's pure parts: the design pair's plan on a 16 GB Mac, when SIGTERM is sent in
each phase, and `--only` runs keeping the other parts' results."""

from __future__ import annotations

import json

from bench import realsize as R
from kd_worker.engine.memory import GB


def test_the_design_pair_at_the_defaults_is_refused_on_a_16_gb_mac_naming_what_fits():
    d = R.design_plans()
    assert 10.5 * GB < d["budget"] < 11 * GB  # the working set of a 16 GB Mac less 5%
    plans = d["plans"]
    defaults = plans["defaults (batch_size 4, max_seq_length 512)"]
    assert 10 * GB < defaults["total"] < 12.5 * GB  # the design's "~10-12 GB total" ...
    assert not defaults["fits_default_budget"] and defaults["peak_phase"] == "train"  # ... is over the budget
    assert defaults["teacher"] + defaults["student"] < 6.1 * GB  # 4-bit weights as stored
    assert plans["batch_size 2"]["fits_default_budget"] and plans["max_seq_length 256"]["fits_default_budget"]
    assert not plans["batch_size 8"]["fits_default_budget"]
    assert plans["batch_size 2"]["total"] < defaults["total"] < plans["batch_size 8"]["total"]
    assert "lower batch_size to 2" in d["defaults_refused"]


def _fire(trigger, progress=None, events=()):
    return trigger(progress or {}, list(events))


def test_sigterm_is_sent_where_a_whole_unit_of_work_is_still_ahead():
    t = R.sigterm_triggers(val_every=3)
    assert list(t) == ["generate", "score", "train+validate", "gate+publish"]
    # generation: after the first batch, while another remains
    assert _fire(t["generate"], {"phase": "generate", "step": 8, "total": 16})
    assert not _fire(t["generate"], {"phase": "generate", "step": 16, "total": 16})
    assert not _fire(t["generate"], {"phase": "score", "step": 1, "total": 2})
    # scoring: as its first batch starts (the log line), not when everything was cached
    assert _fire(t["score"], events=[{"event": "teacher_targets", "cached": 0, "to_score": 16}])
    assert not _fire(t["score"], events=[{"event": "teacher_targets", "cached": 16, "to_score": 0}])
    # training: the step before a validation (step 3 then validates)
    assert _fire(t["train+validate"], {"phase": "train", "step": 2, "total": 6})
    assert not _fire(t["train+validate"], {"phase": "train", "step": 3, "total": 6})
    assert _fire(t["gate+publish"], {"phase": "validate", "step": 0, "total": 1})
    assert _fire(t["gate+publish"], {"phase": "publish", "step": 0, "total": 1})
    assert not _fire(t["gate+publish"], {"phase": "train", "step": 6, "total": 6})


def test_only_runs_keep_the_other_parts_earlier_results(tmp_path):
    (tmp_path / "realsize.json").write_text(json.dumps({"benchmark": "realsize", "peaks": {"a": 1}, "job": {"b": 2}}))
    assert R.previous_results(tmp_path, {"job"}) == {"peaks": {"a": 1}}
    assert R.previous_results(tmp_path / "none", {"job"}) == {}
