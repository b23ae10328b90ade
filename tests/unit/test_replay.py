"""Replay's pure parts: the batch at step s is a function of (seed, s) alone, the share of
replayed rows holds, every example is visited once per epoch, a job with nothing to replay trains
exactly as before; the replay sample is a function of (seed, run id, corpus snapshot); the corpus
record's schema (provenance bounded, content-addressed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from jobs.corpus import PROVENANCE_MAX, Provenance, new_record, parse_corpus_record, utc_now
from jobs.records import example_key
from kd_client.corpus import reservoir_slot
from kd_worker.daemon.continual import choose_replay
from kd_worker.engine.batches import OfflineBatches, ReplayBatches, training_batches
from kd_worker.engine.data import SoftTargets, StudentSequence


def seq(tag: int, n: int = 3) -> StudentSequence:
    """A sequence whose first token names it (tag), so a batch's rows can be read back."""
    t = SoftTargets(
        np.zeros((n, 2), np.int32),
        np.zeros((n, 2), np.float32),
        np.zeros(n, np.float32),
        np.zeros(n, np.float32),
        np.ones(n, np.float32),
    )
    return StudentSequence(np.asarray([tag] + [1] * n, np.int32), 1, t)


def tags(source, step: int) -> list[int]:
    return [int(row[0]) for row in source.batch(step).inputs]


NEW = [seq(100 + i) for i in range(7)]
OLD = [seq(200 + i) for i in range(5)]


def test_a_batch_is_a_pure_function_of_seed_and_step():
    a, b = ReplayBatches(NEW, OLD, 4, 0.5, seed=3), ReplayBatches(NEW, OLD, 4, 0.5, seed=3)
    forward = [tags(a, s) for s in range(40)]
    backward = [tags(b, s) for s in reversed(range(40))][::-1]  # drawn in another order: same batches
    assert forward == backward
    assert forward != [tags(ReplayBatches(NEW, OLD, 4, 0.5, seed=4), s) for s in range(40)]


@pytest.mark.parametrize(("batch_size", "share"), [(4, 0.5), (4, 0.25), (1, 0.3), (6, 0.75)])
def test_the_replayed_share_holds_and_each_stream_visits_every_example_once_per_epoch(batch_size, share):
    src = ReplayBatches(NEW, OLD, batch_size, share, seed=0)
    steps = 70
    rows = [src.rows(s) for s in range(steps)]
    assert all(len(n) + len(o) == batch_size for n, o in rows)
    replayed = sum(len(o) for _, o in rows)
    assert abs(replayed - share * batch_size * steps) < 1  # exact on average, even at batch_size 1
    if share * batch_size == round(share * batch_size):
        assert all(len(o) == round(share * batch_size) for _, o in rows)
    new = np.concatenate([n for n, _ in rows])
    old = np.concatenate([o for _, o in rows])
    for stream, size in ((new, len(NEW)), (old, len(OLD))):
        for e in range(len(stream) // size):
            assert sorted(stream[e * size : (e + 1) * size]) == list(range(size))
    assert src.batch(0).info["replay_rows"] == len(rows[0][1])


def test_nothing_to_replay_trains_exactly_as_before():
    for source in (training_batches(NEW, [], 4, 0.5, 0), training_batches(NEW, OLD, 4, 0.0, 0)):
        assert isinstance(source, OfflineBatches)
        today = OfflineBatches(NEW, 4, 0)
        assert all(tags(source, s) == tags(today, s) for s in range(20))
    assert isinstance(training_batches(NEW, OLD, 4, 0.5, 0), ReplayBatches)


def test_the_replay_sample_is_a_function_of_seed_run_and_snapshot():
    history = [(f"{i:064x}", 100 - i) for i in range(50)]  # (key, seq), not in sequence order
    a = choose_replay(history, 10, seed=1, run_id="job-1")
    assert a == choose_replay(list(reversed(history)), 10, seed=1, run_id="job-1")
    assert len(a) == len(set(a)) == 10
    seqs = dict(history)
    assert [seqs[k] for k in a] == sorted(seqs[k] for k in a)  # oldest first
    assert a != choose_replay(history, 10, seed=1, run_id="job-2")
    assert a != choose_replay(history, 10, seed=2, run_id="job-1")
    assert choose_replay(history, 80, seed=1, run_id="x") == [k for k, _ in sorted(history, key=lambda kv: kv[1])]


def test_reservoir_slots_are_deterministic_and_uniform():
    assert [reservoir_slot("memory", i, 8) for i in range(8, 40)] == [
        reservoir_slot("memory", i, 8) for i in range(8, 40)
    ]
    kept = [reservoir_slot("memory", i, 10) is not None for i in range(10, 5000)]
    # item i is kept with probability cap/(i+1): the expected count is sum(10/(i+1))
    expected = sum(10 / (i + 1) for i in range(10, 5000))
    assert abs(sum(kept) - expected) < 4 * expected**0.5


def record(content: str = "hi", response: str | None = "yo"):
    prompt = ({"role": "user", "content": content},)
    entry = Provenance(job_id="j0", submitter="ego", at=utc_now(), role="train")
    return new_record(example_key(prompt, response), 1, prompt, response, entry)


def test_a_corpus_record_round_trips_and_its_provenance_stays_bounded():
    r = record()
    assert parse_corpus_record(r.model_dump_json()) == r
    for i in range(40):
        r = r.with_provenance(Provenance(job_id=f"j{i + 1}", submitter="ego", at=utc_now(), role="train"))
    assert len(r.provenance) == PROVENANCE_MAX and r.recorded == 41
    assert r.provenance[0].job_id == "j0" and r.provenance[-1].job_id == "j40"  # the first and the latest
    assert r.with_provenance(Provenance(job_id="j40", submitter="x", at=utc_now(), role="held_out")) is r
    assert not r.held_out
    assert r.with_provenance(Provenance(job_id="j99", submitter="x", at=utc_now(), role="held_out")).held_out


def test_a_tampered_or_newer_record_does_not_validate():
    doc = record().model_dump(mode="json")
    with pytest.raises(ValidationError, match="does not match"):
        parse_corpus_record(json.dumps({**doc, "response": "something else"}))
    with pytest.raises(ValidationError):
        parse_corpus_record(json.dumps({**doc, "schema_version": 2}))
    with pytest.raises(ValidationError):
        parse_corpus_record(json.dumps({**doc, "seq": "1"}))  # strict types
