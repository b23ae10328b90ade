"""Models trained on the digit task (kd_worker.fixtures.trained) and the demo's task (demotask):
cached by recipe digest, continued from a base, rebuilt when the base changes; the demo's scoring."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from safetensors.numpy import load_file

from kd_worker.fixtures import demotask, digits, trained
from kd_worker.fixtures.tinymodels import QWEN_TOKENIZER, ModelSpec

SPEC = ModelSpec("t-student", "qwen2", QWEN_TOKENIZER, 32, 1, 2, 1, 64, extra_rows=8, tie_embeddings=True, seed=5)
QUICK = trained.Recipe(("first",), steps=3, batch_size=4, learning_rate=1e-3, warmup=1)


def weights(path) -> dict[str, np.ndarray]:
    return load_file(str(path / "model.safetensors"))


def test_a_trained_model_is_cached_by_its_recipe_and_a_continuation_by_its_base(tmp_path):
    said: list[str] = []
    student = trained.build(SPEC, QUICK, tmp_path, said.append)
    assert said and json.loads((student / "kd_fixture.json").read_text())["digest"] == trained.recipe_digest(
        SPEC, QUICK
    )
    said.clear()
    assert trained.build(SPEC, QUICK, tmp_path, said.append) == student and said == []  # cached: no training

    teacher_spec = replace(SPEC, name="t-teacher")
    more = replace(QUICK, ops=("next", "first"))
    teacher = trained.build(teacher_spec, more, tmp_path, said.append, base=student)
    marker = json.loads((teacher / "kd_fixture.json").read_text())
    assert marker["base"] == trained.fixture_digest(student)
    w_s, w_t = weights(student), weights(teacher)
    assert w_s.keys() == w_t.keys() and any(not np.array_equal(w_s[k], w_t[k]) for k in w_s)  # trained further

    said.clear()
    trained.build(SPEC, replace(QUICK, steps=4), tmp_path, said.append)  # the base changes ...
    trained.build(teacher_spec, more, tmp_path, said.append, base=student)
    assert sum("training t-teacher" in s for s in said) == 1  # ... so the continuation is rebuilt


def test_demo_task_questions_answers_and_scores():
    train = digits.items(30, seed=0, ops=digits.DEMO_OPS)
    item = digits.parse_prompt("next: 9,1,4,2")
    assert item.answers == {"0"} and digits.parse_prompt("prev: 0,5,6,7").answers == {"9"}
    assert digits.parse_prompt("mirror: 2,5,6,7").answers == {"7"}
    held = demotask.held_out(train)
    assert len(held) == demotask.N_EVAL and not {it.prompt for it in held} & {it.prompt for it in train}
    items = held[:4]
    truth = [next(iter(it.answers)) for it in items]
    teacher = truth[:3] + ["x"]  # the teacher is wrong once
    scores = {
        "teacher": demotask.score(teacher, teacher, items),
        "before": demotask.score(["x"] * 4, teacher, items),
        "after": demotask.score(truth, teacher, items),
    }
    assert (scores["before"].exact, scores["before"].agree) == (0.0, 0.25)
    assert (scores["after"].exact, scores["after"].agree, scores["teacher"].exact) == (1.0, 0.75, 0.75)
    assert demotask.verdict(scores) == (
        "student now agrees with the teacher on 75% of held-out answers, was 25%; exact match 0% -> 100% (teacher 75%)"
    )
