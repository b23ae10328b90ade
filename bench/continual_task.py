"""The continual benchmark's facts and models.

A fact is (person, attribute, value): "What is Kolami's favourite colour?" -> "Kolami's favourite
colour is green." Each attribute has four question phrasings; a job's corrections use three of
them and the fourth is held out to test the fact (phrasing `i % 4` for the job's i-th fact, so
every phrasing is trained somewhere). Jobs never share a person: their facts are disjoint.

Models (HF layout, built by `kd_worker.fixtures.trained`'s SFT loop, cached by recipe digest):
  continual-teacher  knows every fact of the benchmark (all four phrasings) and the format
  continual-student  the fixture student's shape; knows the *format* only: the same questions
                     about other people with random answers, so it reads the name and writes the
                     sentence but must learn each benchmark fact from the jobs
Pure Python here apart from `build_models`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kd_worker.fixtures.tinymodels import QWEN_TOKENIZER, ModelSpec, spec_digest
from kd_worker.fixtures.trained import Recipe, build

TASK_VERSION = 1
N_PHRASINGS = 4

ATTRIBUTES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "colour": (
        (
            "What is {n}'s favourite colour?",
            "Which colour does {n} like best?",
            "Tell me {n}'s favourite colour.",
            "Name the colour {n} likes most.",
        ),
        "{n}'s favourite colour is {v}.",
        ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "gold"),
    ),
    "city": (
        ("Where does {n} live?", "In which city does {n} live?", "Tell me the city {n} lives in.", "Name {n}'s city."),
        "{n} lives in {v}.",
        ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Dublin", "Prague", "Athens"),
    ),
    "pet": (
        ("What pet does {n} have?", "Which animal lives with {n}?", "Tell me about {n}'s pet.", "Name {n}'s pet."),
        "{n} has a {v}.",
        ("cat", "dog", "parrot", "rabbit", "horse", "turtle", "goat", "hamster", "lizard", "duck", "snake", "fish"),
    ),
    "instrument": (
        (
            "What instrument does {n} play?",
            "Which instrument is {n} good at?",
            "Tell me the instrument {n} plays.",
            "Name {n}'s instrument.",
        ),
        "{n} plays the {v}.",
        ("piano", "violin", "guitar", "drums", "flute", "cello", "harp", "trumpet", "banjo", "organ", "oboe", "tuba"),
    ),
}
SYLLABLES = ("ka", "lo", "mi", "ra", "te", "su", "no", "vi", "da", "pe", "ri", "zo", "be", "ha", "lu", "fe", "go", "ni")


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: str
    value: str

    def question(self, phrasing: int) -> str:
        return ATTRIBUTES[self.attribute][0][phrasing].format(n=self.name)

    @property
    def response(self) -> str:
        return ATTRIBUTES[self.attribute][1].format(n=self.name, v=self.value)

    @property
    def answer_prefix(self) -> str:
        """The response up to the value ("Kolami's favourite colour is"): what the format gives away."""
        return self.response[: self.response.index(f" {self.value}")]


def person_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def random_fact(rng: random.Random, name: str) -> Fact:
    attribute = rng.choice(sorted(ATTRIBUTES))
    return Fact(name, attribute, rng.choice(ATTRIBUTES[attribute][2]))


def benchmark_facts(n_jobs: int, per_job: int) -> tuple[list[list[Fact]], list[str]]:
    """(facts per job, the format pool's names): disjoint people, fixed across seeds."""
    rng, taken = random.Random(f"continual-facts:{TASK_VERSION}"), set()
    jobs = [[random_fact(rng, n) for n in person_names(rng, per_job, taken)] for _ in range(n_jobs)]
    return jobs, person_names(rng, 300, taken)


def held_out(i: int) -> int:
    return i % N_PHRASINGS


def job_records(facts: list[Fact]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(corrections the job submits: three phrasings per fact, the held-out phrasing per fact)."""
    train, test = [], []
    for i, f in enumerate(facts):
        for p in range(N_PHRASINGS):
            (test if p == held_out(i) else train).append({"prompt": f.question(p), "response": f.response})
    return train, test


def draw_facts(batch_size: int, known: list[Fact], format_names: list[str], known_share: float) -> Callable:
    """SFT batches: `known_share` of the rows are benchmark facts (any phrasing), the rest format
    questions about the pool's people with a fresh random answer each time."""

    def draw(rng: random.Random) -> tuple[list[list[dict]], list[str]]:
        convs, responses = [], []
        for _ in range(batch_size):
            use_known = bool(known) and rng.random() < known_share
            f = rng.choice(known) if use_known else random_fact(rng, rng.choice(format_names))
            convs.append([{"role": "user", "content": f.question(rng.randrange(N_PHRASINGS))}])
            responses.append(f.response)
        return convs, responses

    return draw


SPECS = {  # small enough to train in minutes on 2 busy cores (MLX's per-op cost dominates at this size)
    "continual-teacher": ModelSpec(
        "continual-teacher", "qwen2", QWEN_TOKENIZER, 128, 3, 4, 2, 384, extra_rows=88, tie_embeddings=True, seed=21
    ),
    "continual-student": ModelSpec(
        "continual-student", "qwen2", QWEN_TOKENIZER, 128, 2, 4, 2, 256, extra_rows=24, tie_embeddings=True, seed=22
    ),
}
RECIPES = {
    "continual-teacher": Recipe((), steps=1500, batch_size=16, learning_rate=2e-3),
    "continual-student": Recipe((), steps=500, batch_size=16, learning_rate=2e-3),
}
KNOWN_SHARE = {"continual-teacher": 0.6, "continual-student": 0.0}


N_JOBS, PER_JOB = 5, 10  # the benchmark's facts: the teacher knows all of them


def build_models(root: Path, say: Callable[[str], None] = print) -> dict[str, Path]:
    jobs, pool = benchmark_facts(N_JOBS, PER_JOB)
    known = [f for job in jobs for f in job]
    out = {}
    for name, spec in SPECS.items():
        recipe = RECIPES[name]
        facts = known if KNOWN_SHARE[name] else []
        blob = {
            "v": TASK_VERSION,
            "spec": spec_digest(spec),
            "recipe": asdict(recipe),
            "facts": [asdict(f) for f in facts],
        }
        digest = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
        draw = draw_facts(recipe.batch_size, facts, pool, KNOWN_SHARE[name])
        out[name] = build(spec, recipe, root, say, draw=(draw, digest))
    return out
