"""Which positions train, on hand-built sequences: `collate` hands the loss the response tokens and
nothing else (no prompt, no padding), each label one token after the input that predicts it, its
own teacher row beside it; `student_sequences` cuts tokens, labels and targets together."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jobs.config import KDConfig
from jobs.errors import DataError
from kd_worker.engine.data import Example, SoftTargets, StudentSequence, collate
from kd_worker.engine.distill import student_sequences
from kd_worker.engine.types import Scored
from kd_worker.engine.vocab import VocabPlan

EOS = 2


def marked_targets(n: int, k: int, mark: int) -> SoftTargets:
    """Targets whose first id says which (sequence, response position) they belong to: mark + i."""
    ids = np.stack([mark + i + np.arange(k) * 1000 for i in range(n)]).astype(np.int32) if n else np.zeros((0, k))
    logp = np.log(np.full((n, k), 0.9 / k, np.float32))
    return SoftTargets(
        ids.astype(np.int32),
        logp,
        np.full(n, np.log(0.1), np.float32),
        np.zeros(n, np.float32),
        np.ones(n, np.float32),
    )


def sequence(prompt: list[int], response: list[int], k: int, mark: int) -> StudentSequence:
    return StudentSequence(np.asarray(prompt + response, np.int32), len(prompt), marked_targets(len(response), k, mark))


# three sequences of mixed lengths and supports; one that only just fits, one with a 1-token response
SEQS = [
    sequence([11, 12, 13], [21, 22, 23, EOS], k=4, mark=100),
    sequence([31], [41, 42], k=2, mark=200),
    sequence([51, 52, 53, 54, 55, 56, 57, 58, 59], [61], k=3, mark=300),
]


def flat_index(positions: np.ndarray, width: int) -> list[tuple[int, int]]:
    return [tuple(divmod(int(p), width)) for p in positions]


@pytest.mark.parametrize("order", [[0], [0, 1, 2], [2, 0, 1]], ids=["one", "mixed-lengths", "reordered"])
def test_collate_trains_exactly_the_response_tokens_shifted_by_one(order):
    seqs = [SEQS[i] for i in order]
    b = collate(seqs, pad_id=7)
    width = b.inputs.shape[1]
    assert width % 8 == 0 and width >= max(len(s.tokens) for s in seqs) - 1
    want_rows, want_labels, want_marks = [], [], []
    for row, s in enumerate(seqs):
        n = len(s.tokens) - s.resp_start
        # the logit at column c predicts token c + 1: response token j is predicted at resp_start - 1 + j
        want_rows += [(row, s.resp_start - 1 + j) for j in range(n)]
        want_labels += list(s.tokens[s.resp_start :])
        want_marks += list(s.targets.ids[:, 0])
    assert flat_index(b.positions, width) == want_rows  # no prompt position, no padding position
    assert b.labels.tolist() == want_labels and b.n_tokens == len(want_labels)
    for (row, col), label in zip(flat_index(b.positions, width), b.labels, strict=True):
        assert b.inputs[row, col] == seqs[row].tokens[col] and seqs[row].tokens[col + 1] == label
    assert b.targets.ids[:, 0].tolist() == want_marks  # each position keeps its own teacher row
    for f in ("tail", "lse_t", "kd_mask"):
        assert getattr(b.targets, f).shape == (b.n_tokens,)


def test_collate_pads_on_the_right_and_only_there():
    b = collate(SEQS, pad_id=7)
    for row, s in enumerate(SEQS):
        n_in = len(s.tokens) - 1  # the last token is only ever a label
        assert b.inputs[row, :n_in].tolist() == s.tokens[:-1].tolist()
        assert (b.inputs[row, n_in:] == 7).all()
    other = collate(SEQS, pad_id=0)
    assert np.array_equal(other.positions, b.positions) and np.array_equal(other.labels, b.labels)


def test_a_narrower_support_is_padded_with_slots_that_count_for_neither_side():
    b = collate(SEQS)
    k = b.targets.ids.shape[1]
    assert k == 4
    rows = slice(4, 6)  # the second sequence's two positions, support 2 of 4
    assert np.isneginf(b.targets.logp[rows, 2:]).all() and np.isfinite(b.targets.logp[rows, :2]).all()
    assert (b.targets.ids[rows, 2:] < 1000 * 4 + 400).all()  # valid ids (repeats), never out of range


# -- student_sequences: the student's template around the teacher's response ids -----------------
class CharTokenizer:
    """No chat template: render_prompt joins the messages and encodes, one id per character."""

    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def scored(prompt: str, response: list[int], k: int = 3) -> Scored:
    ex = Example(key=prompt, prompt=({"role": "user", "content": prompt},), response=None, source=f"{prompt!r}")
    return Scored(ex, list(response), marked_targets(len(response), k, mark=500))


def build(items: list[Scored], max_seq_length: int) -> list[StudentSequence]:
    student = SimpleNamespace(tokenizer=CharTokenizer())
    plan = VocabPlan("direct", 5000, 5000, 5000, 5000, 5000)
    cfg = KDConfig(max_seq_length=max_seq_length)
    return student_sequences(SimpleNamespace(), student, items, cfg, plan)  # type: ignore[arg-type]


def test_the_response_follows_the_students_prompt_with_its_eos():
    (s,) = build([scored("hey", [70, 71, EOS])], max_seq_length=64)
    prompt = [ord(c) for c in "hey\n\n"]
    assert s.tokens.tolist() == prompt + [70, 71, EOS] and s.resp_start == len(prompt)
    assert len(s.targets) == 3 and collate([s]).labels.tolist() == [70, 71, EOS]  # the EOS is trained


def test_truncation_at_max_seq_length_cuts_tokens_labels_and_targets_together():
    prompt_len = len("hey there\n\n")
    long = scored("hey there", list(range(60, 90)) + [EOS])  # 31 response tokens
    (s,) = build([long], max_seq_length=prompt_len + 10)
    assert len(s.tokens) == prompt_len + 10
    assert s.tokens[s.resp_start :].tolist() == list(range(60, 70))  # the head, EOS cut off with the rest
    assert s.targets.ids[:, 0].tolist() == long.targets.ids[:10, 0].tolist()  # the same ten positions' rows
    b = collate([s])
    assert b.labels.tolist() == list(range(60, 70)) and b.targets.ids.shape[0] == b.n_tokens == 10


def test_a_prompt_that_leaves_no_room_is_refused():
    with pytest.raises(DataError, match="no room for a response within max_seq_length=16"):
        build([scored("a prompt of more than sixteen characters", [70, EOS])], max_seq_length=16)
