"""The digit-list task of the demo and the quality benchmark (kd_worker.fixtures.digits):
deterministic, every answer checkable."""

from __future__ import annotations

import random

from kd_worker.fixtures import digits as task


def test_items_are_deterministic_distinct_and_cover_every_question_type():
    a, b = task.items(120, seed=7), task.items(120, seed=7)
    assert a == b
    assert len({it.prompt for it in a}) == 120
    assert {it.op for it in a} == set(task.KD_OPS)
    assert task.items(30, seed=8) != task.items(30, seed=7)


def test_held_out_questions_exclude_the_training_prompts():
    train = task.items(200, seed=0)
    held = task.items(200, seed=1, exclude=frozenset(it.prompt for it in train))
    assert not {it.prompt for it in train} & {it.prompt for it in held}


def test_answers_follow_the_rules_and_set_questions_have_sets():
    assert task.answers_for("max", (3, 8, 5, 2), None) == {"8"}
    assert task.answers_for("min", (3, 8, 5, 2), None) == {"2"}
    assert task.answers_for("even", (3, 8, 5, 2), None) == {"8", "2"}
    assert task.answers_for("odd", (3, 8, 5, 2), None) == {"3", "5"}
    assert task.answers_for("above", (3, 8, 5, 2), 4) == {"8", "5"}
    assert task.answers_for("below", (3, 8, 5, 2), 6) == {"3", "5", "2"}
    assert task.answers_for("copy", (3, 8, 5, 2), None) == {"3,8,5,2"}
    sizes = [len(it.answers) for it in task.items(300, seed=3) if it.op in task.SET_OPS]
    assert min(sizes) >= 1 and sum(s > 1 for s in sizes) > len(sizes) / 2


def test_check_accepts_exactly_the_correct_set():
    for it in task.items(60, seed=5, ops=task.KD_OPS + task.FORMAT_OPS):
        for d in map(str, range(10)):
            assert task.check(it, f" {d}\n") == (d in it.answers)
        assert task.check(it, task.sample_answer(it, random.Random(0)))
        assert not task.check(it, "")


def test_prompts_round_trip_through_the_parser():
    for it in task.items(60, seed=2, ops=task.KD_OPS + task.FORMAT_OPS):
        assert task.parse_prompt(it.prompt) == it
