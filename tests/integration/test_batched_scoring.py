"""Batched teacher scoring through the real tiny teacher: sequences scored together (padded to the
longest, LM head in several chunks, the teacher phase split into several batches) get the targets
each one gets scored alone."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.config import KDConfig
from kd_worker.engine import teacher as T
from kd_worker.engine.cache import TargetCache
from kd_worker.engine.data import SoftTargets
from kd_worker.engine.hooks import Hooks
from kd_worker.engine.models import load_model_dir


@pytest.fixture(scope="module")
def teacher(models_root):
    return load_model_dir(models_root / "teacher")


def pairs(lm) -> list[tuple[list[int], list[int]]]:
    """Prompts and responses of very different lengths (padding of 0 to 40 positions)."""
    rng = np.random.default_rng(0)
    out = []
    for text, n in (("hi", 3), ("tell me a long story about the sea and ships", 37), ("why", 1), ("ok then", 12)):
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append((prompt, rng.integers(5, lm.n_tokens, n).tolist()))
    return out


def assert_same_targets(got: SoftTargets, want: SoftTargets) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose(got.logp, want.logp, atol=1e-5)
    np.testing.assert_allclose(got.tail, want.tail, atol=1e-4)
    np.testing.assert_allclose(got.lse_t, want.lse_t, atol=1e-5)
    assert np.array_equal(got.ids, want.ids)
    assert np.array_equal(got.kd_mask, want.kd_mask)


@pytest.mark.parametrize("temperature", [2.0, 1.3])
def test_batched_padded_multi_chunk_scoring_equals_scoring_each_alone(teacher, monkeypatch, temperature):
    seqs = pairs(teacher)
    alone = [T.score(teacher, [s], teacher.n_tokens, 16, temperature)[0] for s in seqs]
    monkeypatch.setattr(T, "SCORE_CHUNK", 5)  # 53 response positions: 11 chunks, the last one partial
    together = T.score(teacher, seqs, teacher.n_tokens, 16, temperature)
    assert [len(t) for t in together] == [len(r) for _, r in seqs]
    for got, want in zip(together, alone, strict=True):
        assert_same_targets(got, want)


def test_the_teacher_phase_in_many_small_batches_equals_one_batch(teacher, tmp_path, monkeypatch):
    seqs = pairs(teacher)
    prompts, responses = [p for p, _ in seqs], [r for _, r in seqs]
    cfg = KDConfig(top_k=16)
    one = T.Teacher(teacher, TargetCache(tmp_path / "one")).targets(prompts, responses, cfg, teacher.n_tokens, Hooks())
    batches = []
    real_score = T.score
    monkeypatch.setattr(T, "SCORE_TOKENS_PER_BATCH", 40)
    monkeypatch.setattr(T, "score", lambda lm, s, *a: batches.append(len(s)) or real_score(lm, s, *a))
    many = T.Teacher(teacher, TargetCache(tmp_path / "many")).targets(
        prompts, responses, cfg, teacher.n_tokens, Hooks()
    )
    assert len(batches) > 1 and sum(batches) == len(seqs)
    for got, want in zip(many, one, strict=True):
        assert_same_targets(got, want)
