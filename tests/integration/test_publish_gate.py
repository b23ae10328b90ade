"""The publish gate with the real engine on the tiny fixtures: a candidate with a higher held-out
KL than the published adapter stays out (unless forced); the decision and both KLs are recorded."""

from __future__ import annotations

import json

import pytest
from helpers import distill, engine_settings

from jobs import publisher
from kd_worker.daemon.runtime import Runtime

# init=base: each candidate starts from the bare student (UNTRAINED is the bare student), not from the published version
COMMON = {"gen_max_tokens": 24, "val_fraction": 0.25, "val_every": 100, "save_every": 100, "init": "base"}
TRAINED = {**COMMON, "iterations": 40, "learning_rate": 1e-3}
UNTRAINED = {**COMMON, "iterations": 1, "learning_rate": 1e-6}  # the bare student: clearly worse


@pytest.fixture(scope="module")
def engine(models_root, tmp_path_factory):
    """One worker's settings and resident models; each call runs a distillation job."""
    tmp = tmp_path_factory.mktemp("gate")
    settings = engine_settings(tmp, keep_versions=5)
    runtime = Runtime(settings)

    def run(run_id: str, overrides: dict, force: bool = False) -> dict:
        return distill(
            tmp,
            models_root,
            overrides=overrides,
            run_id=run_id,
            job_id=run_id,
            force_publish=force,
            settings=settings,
            runtime=runtime,
        )

    return settings.adapters_dir, run


def test_gate_keeps_a_regression_out_unless_forced(engine):
    root, run = engine
    first = run("good-1", TRAINED)
    assert first["published"] and first["version"] == 1
    assert first["gate"]["decision"] == "publish" and first["gate"]["reason"] == "first version of the domain"
    assert first["after"]["kl"] < first["before"]["kl"]

    worse = run("bad-1", UNTRAINED)
    gate = worse["gate"]
    assert not worse["published"] and gate["decision"] == "reject" and gate["published_version"] == 1
    assert gate["candidate_kl"] == pytest.approx(worse["after"]["kl"])
    # the gate scored the published adapter itself: its KL on the same held-out data is job 1's final KL
    assert gate["published_kl"] == pytest.approx(first["after"]["kl"], rel=1e-4)
    assert gate["candidate_kl"] > gate["published_kl"] * 1.01
    print(f"gate: candidate_kl={gate['candidate_kl']:.4f} published_kl={gate['published_kl']:.4f} -> reject")
    assert publisher.resolve(root, "memory").number == 1
    assert [v.number for v in publisher.versions(root, "memory")] == [1]
    entry = publisher.read_summary(root)["domains"]["memory"]
    assert entry["version"] == 1 and entry["job_id"] == "good-1"
    rejected = entry["last_rejected"]
    assert (rejected["decision"], rejected["job_id"]) == ("reject", "bad-1")
    assert (rejected["candidate_kl"], rejected["published_kl"]) == (gate["candidate_kl"], gate["published_kl"])

    forced = run("bad-forced", UNTRAINED, force=True)
    assert forced["published"] and forced["version"] == 2 and forced["gate"]["decision"] == "reject"
    v2 = publisher.resolve(root, "memory")
    assert v2.number == 2 and publisher.verify(v2.path)["summary"]["forced"] is True
    entry = publisher.read_summary(root)["domains"]["memory"]
    assert entry["version"] == 2 and entry["forced"] is True
    assert entry["gate"]["candidate_kl"] == pytest.approx(gate["candidate_kl"])
    assert entry["gate"]["published_kl"] == pytest.approx(gate["published_kl"], rel=1e-4)
    metrics = json.loads((v2.path / "kd_metrics.json").read_text())
    assert metrics["gate"]["decision"] == "reject"


def test_gate_publishes_a_candidate_that_is_not_worse(engine):
    root, run = engine
    if publisher.resolve(root, "memory") is None:
        run("good-0", UNTRAINED)
    current = publisher.resolve(root, "memory")
    better = run("good-2", {**TRAINED, "iterations": 60})
    gate = better["gate"]
    assert better["published"] and gate["decision"] == "publish" and gate["published_version"] == current.number
    assert gate["candidate_kl"] <= gate["published_kl"]
    entry = publisher.read_summary(root)["domains"]["memory"]
    assert entry["version"] == better["version"] and entry["forced"] is False
    assert (entry["gate"]["candidate_kl"], entry["gate"]["published_kl"]) == (
        gate["candidate_kl"],
        gate["published_kl"],
    )
