"""The quality benchmark's task: questions about a short list of distinct digits, as chat prompts.

    max: 3,8,5,2      -> 8              one correct answer (deterministic)
    min: 3,8,5,2      -> 2
    even: 3,8,5,2     -> 8 or 2         several correct answers: the teacher spreads its
    odd: 3,8,5,2      -> 3 or 5         probability over the set (dark knowledge that one
    above 4: 3,8,5,2  -> 8 or 5         sampled response per prompt cannot carry)
    below 6: 3,8,5,2  -> 3, 5 or 2
    sort: 3,8,5,2     -> 2,3,5,8        a sequence answer (7-11 tokens): one early wrong token
                                        derails the rest (the exposure-bias task, `SEQ_OPS`)

Every answer is checkable (`check`). The student's base learns only the *format* on other
questions about the same lists (`FORMAT_OPS`: first, last, count, copy), so LoRA distillation
has a reader of digit lists to build on but must learn the KD questions from the teacher.
Digits are comma-separated without spaces: every item and every answer is one token in both
tiny tokenizers (a space before a digit tokenizes irregularly there). Pure Python, no mlx.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASK_VERSION = 1  # bump when questions, answers or rendering change: cached models are rebuilt
KD_OPS = ("max", "min", "even", "odd", "above", "below")  # what the teacher knows and the student learns
SET_OPS = frozenset({"even", "odd", "above", "below"})  # several correct answers
FORMAT_OPS = ("first", "last", "count", "copy")  # the student base's pretraining (format competence)
SEQ_OPS = ("sort",)  # multi-token answers where the student's own early mistakes derail the rest (on-policy)
MIN_ITEMS, MAX_ITEMS = 4, 6


@dataclass(frozen=True)
class Item:
    op: str
    digits: tuple[int, ...]
    k: int | None  # the threshold of above/below
    answers: frozenset[str]  # every correct response

    @property
    def prompt(self) -> str:
        head = self.op if self.k is None else f"{self.op} {self.k}"
        return f"{head}: {','.join(map(str, self.digits))}"

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def single(self) -> bool:
        return len(self.answers) == 1


def answers_for(op: str, digits: tuple[int, ...], k: int | None) -> frozenset[str]:
    if op == "max":
        return frozenset({str(max(digits))})
    if op == "min":
        return frozenset({str(min(digits))})
    if op == "first":
        return frozenset({str(digits[0])})
    if op == "last":
        return frozenset({str(digits[-1])})
    if op == "count":
        return frozenset({str(len(digits))})
    if op == "copy":
        return frozenset({",".join(map(str, digits))})
    if op == "sort":
        return frozenset({",".join(map(str, sorted(digits)))})
    keep = {
        "even": lambda d: d % 2 == 0,
        "odd": lambda d: d % 2 == 1,
        "above": lambda d: k is not None and d > k,
        "below": lambda d: k is not None and d < k,
    }[op]
    return frozenset(str(d) for d in digits if keep(d))


def make_item(rng: random.Random, op: str) -> Item:
    """One question with at least one correct answer (lists are redrawn until there is one)."""
    while True:
        digits = tuple(rng.sample(range(10), rng.randint(MIN_ITEMS, MAX_ITEMS)))
        k = rng.randint(1, 8) if op in ("above", "below") else None
        answers = answers_for(op, digits, k)
        if answers:
            return Item(op, digits, k, answers)


def items(n: int, seed: int, ops: tuple[str, ...] = KD_OPS, exclude: frozenset[str] = frozenset()) -> list[Item]:
    """n distinct questions (ops in turn), none whose prompt is in `exclude`; deterministic in seed."""
    rng = random.Random(f"quality:{seed}")
    out: list[Item] = []
    seen = set(exclude)
    while len(out) < n:
        item = make_item(rng, ops[len(out) % len(ops)])
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
    return out


def sample_answer(item: Item, rng: random.Random) -> str:
    """A uniformly drawn correct response (how the teacher's training data spreads over a set)."""
    return rng.choice(sorted(item.answers))


def first_answer(item: Item) -> str:
    """The first correct item in list order: a deterministic house convention for set questions."""
    return (
        next(str(d) for d in item.digits if str(d) in item.answers)
        if len(item.answers) > 1
        else next(iter(item.answers))
    )


def check(item: Item, response: str) -> bool:
    """Exact match of the response (surrounding whitespace ignored) against the correct set."""
    return response.strip() in item.answers


def parse_prompt(prompt: str) -> Item:
    """The Item of a rendered prompt (e.g. to check responses read back from a JSONL file)."""
    head, _, body = prompt.partition(": ")
    op, _, k = head.partition(" ")
    digits = tuple(int(d) for d in body.split(","))
    kk = int(k) if k else None
    return Item(op, digits, kk, answers_for(op, digits, kk))
