"""Samples a person can read: a few held-out prompts with the teacher's response and the student's
greedy response before and after training, kept in kd_metrics.json.

Numbers alone do not tell an operator whether a neuron got better; three answers side by side do.
The samples are the first `cfg.samples` sequences of the held-out split, in its deterministic
order (engine.data.split_examples), so every run of a job shows the same prompts. "Before" is
generated from the student base before LoRA is attached, "after" with the trained adapter that is
published; both greedy, capped at gen_max_tokens, in one batch each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.config import KDConfig
from kd_worker.engine.data import Example, StudentSequence
from kd_worker.engine.hooks import Hooks, check_stop
from kd_worker.engine.models import LoadedModel
from kd_worker.engine.teacher import generate, make_sampler


@dataclass(frozen=True)
class Probe:
    """The held-out prompts sampled before and after training (student token ids)."""

    examples: tuple[Example, ...]
    seqs: tuple[StudentSequence, ...]

    @classmethod
    def choose(cls, val_ex: Sequence[Example], val: Sequence[StudentSequence], n: int) -> Probe:
        """The first n held-out examples (none when the job has no held-out split or n = 0)."""
        k = min(n, len(val_ex), len(val))
        return cls(tuple(val_ex[:k]), tuple(val[:k]))

    def greedy(self, student: LoadedModel, cfg: KDConfig, hooks: Hooks) -> list[str]:
        """The student's greedy responses as text, in eval mode (no dropout), special tokens dropped."""
        if not self.seqs:
            return []
        prompts = [[int(t) for t in s.tokens[: s.resp_start]] for s in self.seqs]
        budgets = [max(1, min(cfg.gen_max_tokens, cfg.max_seq_length - len(p))) for p in prompts]
        sampler = make_sampler(0.0, 0, 1.0, student.n_tokens)
        was_training = student.model.training
        student.model.eval()
        try:
            out = generate(student, prompts, budgets, sampler, len(prompts), lambda: _stop(hooks))
        finally:
            if was_training:
                student.model.train()
        return [decode(student, ids) for ids in out]

    def documents(self, student: LoadedModel, before: list[str], after: list[str]) -> list[dict[str, str]]:
        """kd_metrics.json "samples": prompt, teacher, before, after (text)."""
        return [
            {
                "prompt": prompt_text(ex),
                "teacher": decode(student, [int(t) for t in s.tokens[s.resp_start :]]),
                "before": b,
                "after": a,
            }
            for ex, s, b, a in zip(self.examples, self.seqs, before, after, strict=True)
        ]


def _stop(hooks: Hooks) -> None:
    check_stop(hooks, "while sampling held-out answers", "the job resumes from its last checkpoint")


def decode(lm: LoadedModel, ids: Sequence[int]) -> str:
    """Text of response ids without special tokens (the EOS a response ends with)."""
    return str(lm.hf_tokenizer.decode(list(ids), skip_special_tokens=True)).strip()


def prompt_text(ex: Example) -> str:
    """The conversation as a person reads it: the last user turn, earlier turns prefixed by role."""
    turns = list(ex.prompt)
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)
