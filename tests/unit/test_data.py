"""Examples from JSONL files: identical conversations collapse into one example whatever form or
file they come in; the held-out split is a pure function of (content, seed) and stays put when
examples are appended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import DataError
from kd_worker.engine.data import Example, example_key, load_examples, split_examples


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def example(i: int) -> Example:
    prompt = ({"role": "user", "content": f"question number {i}"},)
    return Example(example_key(prompt, None), prompt, None, f"line {i}")


def keys(examples: list[Example]) -> set[str]:
    return {e.key for e in examples}


def test_identical_conversations_collapse_whatever_their_form_or_file(tmp_path):
    user = {"role": "user", "content": "what is KD?"}
    prompts = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "what is KD?"},
            {"messages": [user]},  # the same conversation, other form
            {"prompt": "what is KD?", "id": "x7", "meta": {"from": "ego"}},  # id/meta are not content
            {"prompt": "what is LoRA?"},
        ],
    )
    corrections = write(
        tmp_path / "c.jsonl",
        [
            {"prompt": "what is KD?", "response": "distillation"},  # a response makes it another example
            {"messages": [user, {"role": "assistant", "content": "distillation"}]},
            {"prompt": "what is KD?", "response": "something else"},
        ],
    )
    again = write(tmp_path / "again.jsonl", [{"prompt": "what is LoRA?"}])
    got = load_examples([("prompts", prompts), ("corrections", corrections), ("prompts", again)], 100)
    assert [(e.prompt[-1]["content"], e.response) for e in got] == [
        ("what is KD?", None),
        ("what is LoRA?", None),
        ("what is KD?", "distillation"),
        ("what is KD?", "something else"),
    ]
    assert [e.source for e in got] == ["p.jsonl record 1", "p.jsonl record 4", "c.jsonl record 1", "c.jsonl record 3"]
    assert len(keys(got)) == 4


def test_the_example_limit_counts_distinct_examples(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"prompt": f"q{i % 3}"} for i in range(30)])
    assert len(load_examples([("prompts", f)], 3)) == 3  # 30 lines, 3 examples: within a limit of 3
    with pytest.raises(DataError, match="more than 2 examples"):
        load_examples([("prompts", f)], 2)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_the_split_is_a_pure_function_of_content_and_seed(fraction):
    examples = [example(i) for i in range(40)]
    train, val = split_examples(examples, fraction, seed=3)
    assert keys(train) | keys(val) == keys(examples) and not keys(train) & keys(val)
    again = split_examples(list(reversed(examples)), fraction, seed=3)  # order of the files does not matter
    assert (keys(again[0]), keys(again[1])) == (keys(train), keys(val))
    assert [e.key for e in again[0]] == [e.key for e in train]  # nor the training order
    other = split_examples(examples, fraction, seed=4)
    assert keys(other[1]) != keys(val)  # the seed picks another held-out set
    assert 0.4 * fraction * 40 <= len(val) <= 2 * fraction * 40


@pytest.mark.parametrize("fraction", [0.1, 0.25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_appended_examples_never_move_earlier_ones_across_the_split(fraction, seed):
    """A held-out example stays held out (never trained on by a later job of the domain) and a
    training example is never turned into held-out data, however the set grows."""
    examples = [example(i) for i in range(300)]
    before = split_examples(examples[:60], fraction, seed)
    for n in (61, 63, 70, 90, 150, 300):
        train, val = split_examples(examples[:n], fraction, seed)
        assert keys(before[1]) <= keys(val), f"a held-out example moved into training at {n} examples"
        assert keys(before[0]) <= keys(train), f"a training example became held-out at {n} examples"
        before = train, val


def test_tiny_sets_keep_one_example_on_each_side():
    assert split_examples([example(0)], 0.5, 0) == ([example(0)], [])
    for n in (2, 3, 5):
        train, val = split_examples([example(i) for i in range(n)], 0.1, 0)
        assert len(val) >= 1 and len(train) >= 1
    assert split_examples([example(i) for i in range(5)], 0.0, 0)[1] == []
