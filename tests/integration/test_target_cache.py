"""The teacher's content-addressed cache: a rerun with identical settings redoes no teacher work and
gets identical targets; any setting that changes what the teacher would produce (temperature,
top-k, vocabulary, the teacher itself, every generation setting, the generation budget) misses."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from jobs.config import KDConfig
from kd_worker.engine import teacher as T
from kd_worker.engine.cache import TargetCache
from kd_worker.engine.data import Example, example_key
from kd_worker.engine.hooks import Hooks
from kd_worker.engine.models import load_model_dir

BASE = {"gen_max_tokens": 6, "top_k": 8, "gen_batch_size": 4}


@pytest.fixture(scope="module")
def teachers(models_root):
    return {name: load_model_dir(models_root / name) for name in ("teacher", "teacher-8bit")}


@pytest.fixture
def work(tmp_path, teachers, monkeypatch):
    """run(teacher name, **settings) -> (targets, {"generated": n, "scored": n}) over one shared cache."""
    done: Counter[str] = Counter()
    real_generate, real_score = T.generate, T.score
    monkeypatch.setattr(T, "generate", lambda lm, p, *a: done.update(generated=len(p)) or real_generate(lm, p, *a))
    monkeypatch.setattr(T, "score", lambda lm, s, *a: done.update(scored=len(s)) or real_score(lm, s, *a))
    messages = [({"role": "user", "content": t},) for t in ("what is a cache", "name three rivers", "why is the sky")]
    examples = [Example(example_key(m, None), m, None, f"line {i}") for i, m in enumerate(messages)]

    def run(name: str = "teacher", n_vocab: int | None = None, **settings):
        done.clear()
        lm = teachers[name]
        cfg = KDConfig(**{**BASE, **settings})
        teacher = T.Teacher(lm, TargetCache(tmp_path / "cache"))  # a new object each run, like a new job
        prompts = teacher.prompts(examples, cfg.max_seq_length)
        responses = teacher.responses(examples, prompts, cfg, Hooks())
        targets = teacher.targets(prompts, responses, cfg, n_vocab or lm.n_tokens, Hooks())
        return (responses, targets), dict(done)

    return run


def test_identical_settings_reuse_everything(work):
    first, did = work()
    assert did == {"generated": 3, "scored": 3}
    again, did = work()
    assert did == {}  # no teacher work at all
    assert again[0] == first[0]
    for a, b in zip(again[1], first[1], strict=True):
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("ids", "logp", "tail", "lse_t"))


@pytest.mark.parametrize(
    "change",
    [{"temperature": 1.0}, {"temperature": 3.0}, {"top_k": 16}, {"top_k": "full"}, {"n_vocab": 900}],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_a_scoring_setting_rescores_but_keeps_the_responses(work, change):
    work()
    _, did = work(**change)
    assert did == {"scored": 3}


@pytest.mark.parametrize(
    "change",
    [
        {"gen_temperature": 0.0},
        {"gen_top_k": 5},
        {"gen_top_p": 0.5},
        {"gen_max_tokens": 9},
        {"seed": 1},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_a_generation_setting_regenerates(work, change):
    work()
    _, did = work(**change)
    assert did.get("generated") == 3


def test_a_budget_cut_response_is_not_reused_when_the_budget_grows(work):
    """max_seq_length bounds generation too: a response cut short by a small budget is not what a
    run with room would generate."""
    (short, _), _ = work(max_seq_length=40, gen_max_tokens=24)
    (long, _), did = work(max_seq_length=512, gen_max_tokens=24)
    assert did.get("generated") == 3
    assert max(map(len, short)) < max(map(len, long))
    _, did = work(max_seq_length=1024, gen_max_tokens=24)  # more room, the same budget: reused
    assert did == {}


def test_another_teacher_redoes_everything(work):
    work()
    _, did = work("teacher-8bit")
    assert did == {"generated": 3, "scored": 3}
