"""Vocabulary guard: may the teacher's token distributions be compared with the student's?

Decided by the tokenizers' vocabularies (token -> id, added tokens included), never by model
names or `config.vocab_size`:
  direct  identical tokenizers and embedding sizes
  sliced  identical tokenizers, different embedding padding (Qwen2.5-7B: 152,064 rows, 3B:
          151,936, over the same 151,665 tokens): both sides are cut to len(tokenizer)
  cross   different tokenizers: token ids mean different things, so "truncate the teacher's
          logits to the student's vocabulary size" would pair unrelated tokens and train noise;
          routed to cross-tokenizer distillation (kd_worker.engine.xtok) when enabled, else refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jobs.errors import VocabularyMismatch

VocabMode = Literal["direct", "sliced", "cross"]


@dataclass(frozen=True)
class VocabPlan:
    mode: VocabMode
    n_vocab: int  # ids below this are real tokens (the teacher's, in cross mode)
    teacher_tokens: int
    student_tokens: int
    teacher_rows: int
    student_rows: int
    notes: tuple[str, ...] = ()

    @property
    def student_vocab(self) -> int:
        """Logit columns of the student's head that are real tokens (its own, in cross mode)."""
        return self.student_tokens if self.mode == "cross" else self.n_vocab


def describe(tokenizer: Any, path: Any, identity: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    return f"{path} ({len(tokenizer):,} tokens, eos {eos!r}, tokenizer {identity[:12]})"


def compare_tokenizers(t: Any, s: Any) -> tuple[bool, list[str]]:
    """(same vocabulary?, notes). Special tokens that differ only in role are noted, not fatal."""
    tv, sv = t.get_vocab(), s.get_vocab()
    if tv != sv:
        shared = sum(1 for tok, i in tv.items() if sv.get(tok) == i)
        return False, [f"{shared:,} of {len(tv):,} teacher tokens have the same id in the student"]
    notes = []
    ts, ss = set(t.all_special_tokens), set(s.all_special_tokens)
    if ts != ss:
        notes.append(f"special tokens differ in role only: {sorted(ts ^ ss)}")
    return True, notes


def plan_vocabulary(teacher: Any, student: Any, allow_cross: bool) -> VocabPlan:
    """`teacher`/`student` are LoadedModel-like (hf_tokenizer, n_tokens, rows, path, tokenizer_identity)."""
    notes: list[str] = []
    if teacher.tokenizer_identity == student.tokenizer_identity:  # same files: skip the 152k-entry comparison
        same = True
    else:
        same, notes = compare_tokenizers(teacher.hf_tokenizer, student.hf_tokenizer)
    sizes = dict(
        teacher_tokens=teacher.n_tokens,
        student_tokens=student.n_tokens,
        teacher_rows=teacher.rows,
        student_rows=student.rows,
    )
    if same:
        mode: VocabMode = "direct" if teacher.rows == student.rows else "sliced"  # both cut to n_tokens either way
        return VocabPlan(mode, teacher.n_tokens, notes=tuple(notes), **sizes)
    if allow_cross:
        return VocabPlan("cross", teacher.n_tokens, notes=tuple(notes), **sizes)
    raise VocabularyMismatch(
        "teacher and student tokenizers differ: teacher "
        f"{describe(teacher.hf_tokenizer, teacher.path, teacher.tokenizer_identity)} vs student "
        f"{describe(student.hf_tokenizer, student.path, student.tokenizer_identity)}; {notes[0]}. "
        "Their token ids mean different things, so distributions cannot be compared id by id "
        "(truncating to the smaller vocabulary would train noise). Use a student with the teacher's "
        "tokenizer, or enable cross-tokenizer distillation."
    )
