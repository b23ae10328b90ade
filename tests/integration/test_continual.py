"""The continual loop with the real engine on the tiny fixtures and a real redis-server holding the
corpus (`daemon.lifecycle.run_job`, as the queue task calls it): replay is frozen per run and a
resumed run is bit-exact however the corpus grew; warm start loads the published adapter or falls
back; the regression-set gate rejects a forgetting candidate and publishes a good one; `forget`
keeps an example out of every later job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import distill, engine_settings, kd_client

from jobs import publisher
from jobs.config import resolve_config
from jobs.errors import JobInterrupted
from jobs.records import example_key
from kd_client.corpus import Corpus, CorpusLimits
from kd_worker.daemon.continual import FROZEN
from kd_worker.daemon.runtime import Runtime
from kd_worker.engine.checkpoints import load_arrays
from kd_worker.engine.data import load_examples, split_examples

PHRASINGS = ("What is {n}'s favourite colour?", "Which colour does {n} like?", "Tell me {n}'s colour.", "{n}: colour?")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey")
# alpha=1: the student learns the teacher's distribution, which is what the gate's KL measures
QUICK = {"iterations": 24, "batch_size": 4, "val_fraction": 0.25, "val_every": 1000, "save_every": 6, "alpha": 1.0}
GATED = {**QUICK, "iterations": 40, "learning_rate": 1e-3}


def facts(tmp: Path, tag: str, n: int) -> tuple[tuple[str, Path], ...]:
    """n facts about people named after `tag`, each in every phrasing (the split holds some out)."""
    rows = [
        {"prompt": p.format(n=f"{tag}{i}"), "response": f"{tag}{i}'s favourite colour is {COLOURS[(i * 5) % 11]}."}
        for i in range(n)
        for p in PHRASINGS
    ]
    path = tmp / f"{tag}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (("corrections", path),)


def keys_of(data: tuple[tuple[str, Path], ...]) -> set[str]:
    out = set()
    for line in data[0][1].read_text().splitlines():
        r = json.loads(line)
        out.add(example_key(({"role": "user", "content": r["prompt"]},), r["response"]))
    return out


def split(data: tuple[tuple[str, Path], ...], overrides: dict) -> tuple[set[str], set[str]]:
    """The keys of the (training, held-out) split the engine makes of `data` under `overrides`."""
    cfg = resolve_config(overrides)
    train, val = split_examples(load_examples(data, 10_000), cfg.val_fraction, cfg.seed)
    return {e.key for e in train}, {e.key for e in val}


def adapter(outcome: dict) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in load_arrays(Path(outcome["adapter_path"]) / publisher.WEIGHTS).items()}


def metrics(outcome: dict) -> dict:
    return json.loads((Path(outcome["adapter_path"]) / publisher.METRICS).read_text())


@pytest.fixture
def corpus(redis_url) -> Corpus:
    return Corpus(redis.Redis.from_url(redis_url), "memory", CorpusLimits(10_000, 10**8, 64))


@pytest.fixture
def job(tmp_path, models_root, corpus):
    """run(run_id, data, overrides, where="a", **kw): one run_job with the corpus, in work dir `where`."""
    runtime = Runtime(engine_settings(tmp_path / "a"))

    def run(run_id: str, data, overrides: dict, where: str = "a", **kw) -> dict:
        # the fixture teacher is random: KLs of ~0.05, below the default regression slack (calibrated
        # by bench/continual.py on a teacher that knows its facts); test the relative rule alone
        settings = engine_settings(tmp_path / where, gate_regression_slack=0.0)
        return distill(
            tmp_path / where,
            models_root,
            data=data,
            overrides=overrides,
            run_id=run_id,
            job_id=run_id,
            settings=settings,
            runtime=runtime,
            corpus=kw.pop("corpus", corpus),
            **kw,
        )

    return run


def test_replay_is_frozen_per_run_and_a_resumed_run_is_bit_exact(job, corpus, tmp_path):
    first = facts(tmp_path, "ada", 6)
    job("j1", first, QUICK)
    second = facts(tmp_path, "bob", 6)
    replaying = {**QUICK, "replay": 0.5, "iterations": 12, "init": "base"}  # dir b has no published version
    straight = job("j2", second, replaying, force_publish=True)
    m = metrics(straight)["continual"]
    assert m["replay"]["rows"] == 2 * 12  # 2 of every 4 rows
    replayed = set(m["replay"]["keys"])
    assert replayed == split(first, QUICK)[0] and not replayed & keys_of(second)  # job 1's training split
    assert not replayed & set(corpus.regression_keys())  # held-out examples are never replayed

    # the same run in another work dir, stopped at step 6; meanwhile the corpus grows
    progress, should_stop = stop_at(6)
    with pytest.raises(JobInterrupted):
        job("j2", second, replaying, where="b", force_publish=True, progress=progress, should_stop=should_stop)
    frozen = json.loads((tmp_path / "b" / "work" / "runs" / "j2" / FROZEN).read_text())
    assert [r["key"] for r in frozen["replay"]] == m["replay"]["keys"]
    job("j3", facts(tmp_path, "cy", 6), {**QUICK, "iterations": 1})
    assert len(corpus.history(exclude=keys_of(second))) > len(replayed)  # a fresh choice would differ now
    resumed = job("j2", second, replaying, where="b", force_publish=True)
    assert metrics(resumed)["timing"]["resumed_from"] == 6
    assert metrics(resumed)["continual"]["replay"]["keys"] == m["replay"]["keys"]  # the frozen sample
    assert not (tmp_path / "b" / "work" / "runs" / "j2" / FROZEN).exists()  # a finished run keeps only its outcome
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def stop_at(step: int):
    """(progress, should_stop) for helpers.distill: a warm shutdown once training reached `step`."""
    seen = {"step": 0}

    def progress(p) -> None:
        if p.phase == "train":
            seen["step"] = p.step

    def should_stop() -> str | None:
        return "shutdown" if seen["step"] >= step else None

    return progress, should_stop


def test_warm_start_loads_the_published_adapter_or_falls_back_to_the_base(job, tmp_path):
    data = facts(tmp_path, "ada", 4)
    warm = {**QUICK, "iterations": 6, "init": "current"}
    first = job("w1", data, warm)
    assert metrics(first)["continual"]["init"] == {
        "requested": "current",
        "used": "base",
        "reason": "the domain has no published version",
    }
    other_shape = job("w2", data, {**warm, "lora_rank": 4}, force_publish=True)
    init = metrics(other_shape)["continual"]["init"]
    assert init["used"] == "base" and "lora_parameters.rank 8 != 4" in init["reason"]
    # same shape: the candidate starts from v2's weights (one step at a negligible learning rate keeps them)
    same = job("w3", data, {**warm, "lora_rank": 4, "iterations": 1, "learning_rate": 1e-12}, force_publish=True)
    init = metrics(same)["continual"]["init"]
    assert (init["used"], init["version"]) == ("current", 2)
    published, candidate = adapter(other_shape), adapter(same)
    assert all(np.allclose(published[k], candidate[k], atol=1e-6) for k in published)
    assert publisher.read_summary(tmp_path / "a" / "adapters_kd")["domains"]["memory"]["init"]["version"] == 2


def test_the_regression_gate_rejects_a_forgetting_candidate_and_publishes_a_good_one(job, corpus, tmp_path):
    data_a, data_b = facts(tmp_path, "ada", 8), facts(tmp_path, "bob", 8)
    (train_a, val_a), (train_b, val_b) = split(data_a, GATED), split(data_b, GATED)
    a = job("g1", data_a, GATED)
    assert a["published"] and a["version"] == 1
    assert set(corpus.regression_keys()) == val_a  # job 1's held-out split joined when it concluded

    # fresh LoRA, new facts only: better than v1 on its own held-out data, worse on what v1 knew
    forgetful = job("g2", data_b, {**GATED, "replay": 0.0, "init": "base"})
    gate = forgetful["gate"]
    assert not forgetful["published"] and gate["decision"] == "reject"
    assert gate["reason"].startswith("forgets earlier jobs") and "better on this job's held-out" in gate["reason"]
    assert gate["held_out"]["candidate_kl"] < gate["held_out"]["published_kl"]
    assert gate["regression"]["examples"] == len(val_a)
    assert gate["regression"]["candidate_kl"] > gate["regression"]["published_kl"] * 1.01
    entry = publisher.read_summary(tmp_path / "a" / "adapters_kd")["domains"]["memory"]
    assert entry["version"] == 1 and entry["last_rejected"]["reason"] == gate["reason"]

    # the continual loop's job: warm start + replay of everything before (the rejected job's data included)
    good = job("g3", facts(tmp_path, "cy", 8), {**GATED, "replay": 0.5, "init": "current"})
    gate = good["gate"]
    assert good["published"] and gate["decision"] == "publish", gate
    assert gate["regression"]["examples"] == len(val_a | val_b)  # job 3's own held-out split is not counted
    assert gate["regression"]["candidate_kl"] <= gate["regression"]["published_kl"] * 1.01
    m = metrics(good)
    assert m["gate"] == gate and m["continual"]["init"]["used"] == "current"
    assert set(m["continual"]["replay"]["keys"]) == train_a | train_b  # the rejected job's data included


def test_forget_keeps_an_example_out_of_every_later_job(job, corpus, tmp_path, env):
    first = facts(tmp_path, "ada", 6)
    train, val = split(first, QUICK)
    job("f1", first, QUICK)
    replayable, regression = corpus.history()[0][0], corpus.regression_keys()[0]
    out = kd_client(env, "data", "--domain", "memory", "forget", replayable[:12], regression, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["forgotten"] == [replayable, regression]
    listed = json.loads(kd_client(env, "data", "--domain", "memory", "list", "--limit", "0", "--json").stdout)
    assert len(listed) == 22 and not {r["id"] for r in listed} & {replayable, regression}
    assert all(
        json.loads(line)["id"] not in (replayable, regression)
        for line in kd_client(env, "data", "--domain", "memory", "export").stdout.splitlines()
    )

    later = job("f2", facts(tmp_path, "bob", 6), {**QUICK, "replay": 0.5}, force_publish=True)
    keys = metrics(later)["continual"]["replay"]["keys"]
    assert set(keys) == train - {replayable}
    assert later["gate"]["regression"]["examples"] == len(val) - 1
    assert regression not in corpus.regression_keys()
