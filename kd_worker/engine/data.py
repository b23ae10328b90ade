"""Data: JSONL files -> examples -> student token sequences -> padded batches (which batch
is trained when is `kd_worker.engine.batches`' business)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jobs.errors import DataError
from jobs.records import example_key, read_records


@dataclass(frozen=True)
class Example:
    key: str  # content hash: identical conversations collapse into one example
    prompt: tuple[dict[str, str], ...]  # messages up to (excluding) the assistant's turn
    response: str | None  # given (corrections) or None (the teacher generates it)
    source: str  # "file line" for error messages


@dataclass
class SoftTargets:
    """Teacher targets for the response tokens of one example (numpy, N = response length)."""

    ids: np.ndarray  # [N, K] int32
    logp: np.ndarray  # [N, K] float32, T=1, -inf for padding slots
    tail: np.ndarray  # [N] float32 log mass outside the support
    lse_t: np.ndarray  # [N] float32 logsumexp(log p / T), full vocabulary
    kd_mask: np.ndarray  # [N] float32
    uld_mask: np.ndarray | None = None  # [N] float32 1: tokenizer-agnostic ULD row (cross-tokenizer only)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    def head(self, n: int) -> "SoftTargets":
        """The targets of the first n response tokens (a response cut to max_seq_length)."""
        return SoftTargets(
            **{f: getattr(self, f)[:n] for f in FIELDS}, uld_mask=None if self.uld_mask is None else self.uld_mask[:n]
        )


FIELDS = ("ids", "logp", "tail", "lse_t", "kd_mask")  # the stored arrays of SoftTargets (uld_mask is derived)


@dataclass
class StudentSequence:
    """One student training sequence: tokens + targets for its response part."""

    tokens: np.ndarray  # [L] int32, prompt + response (EOS included when the teacher stopped)
    resp_start: int  # index of the first response token in `tokens`
    targets: SoftTargets  # aligned to tokens[resp_start:]


@dataclass
class Batch:
    inputs: np.ndarray  # [B, L-1] int32 (right-padded)
    positions: np.ndarray  # [N] int32 flat indices into inputs predicting each response token
    labels: np.ndarray  # [N] int32
    targets: SoftTargets  # concatenated over the batch, [N, K]
    # A batch source may train its batches on another objective (e.g. reverse KL on-policy; None:
    # the loop's own) and report a few numbers per step (kd_metrics.json's "train" rows).
    objective: Any = None  # kd_worker.engine.objective.Objective | None
    info: dict[str, float] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.labels.shape[0])


def load_examples(files: Sequence[tuple[Literal["prompts", "corrections"], Path]], max_examples: int) -> list[Example]:
    """Read and validate every file; duplicates collapse; the first bad line raises a DataError."""
    seen: dict[str, Example] = {}
    for kind, path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {kind} file {path}: {e.strerror}") from e
        for n, rec in enumerate(read_records(data, kind, Path(path).name), start=1):
            prompt, response = rec.conversation()
            key = example_key(prompt, response)
            seen.setdefault(key, Example(key, prompt, response, f"{Path(path).name} record {n}"))
            if len(seen) > max_examples:
                raise DataError(f"more than {max_examples} examples; split the job or raise KD_MAX_EXAMPLES")
    return list(seen.values())


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split by content hash. An example is held out when its hash, read as a
    number in [0, 1), is below `val_fraction`: its side depends on its own content and the seed only,
    so appending examples never moves an earlier one across (a held-out example stays unseen by
    training). Both sides keep at least one example; in a set that small, the one example moved to
    make that so can move back when others arrive."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []

    def rank(e: Example) -> str:
        return hashlib.sha256(f"{seed}:{e.key}".encode()).hexdigest()

    ordered = sorted(examples, key=rank)
    below = sum(int(rank(e)[:16], 16) < val_fraction * 2**64 for e in ordered)
    n_val = min(max(1, below), len(examples) - 1)
    return ordered[n_val:], ordered[:n_val]


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with the model's chat template, ready for the assistant turn."""
    if getattr(tokenizer, "has_chat_template", False):
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return list(tokenizer.encode(text))


def collate(seqs: Sequence[StudentSequence], pad_id: int = 0, pad_to: int = 8) -> Batch:
    """Right-pad to a multiple of `pad_to`; gather response positions; concatenate targets."""
    longest = max(len(s.tokens) for s in seqs) - 1
    width = -(-longest // pad_to) * pad_to
    k = max(s.targets.ids.shape[1] for s in seqs)
    inputs = np.full((len(seqs), width), pad_id, np.int32)
    positions, labels, parts = [], [], []
    for b, s in enumerate(seqs):
        inputs[b, : len(s.tokens) - 1] = s.tokens[:-1]
        n = len(s.tokens) - s.resp_start
        positions.append(b * width + s.resp_start - 1 + np.arange(n, dtype=np.int32))
        labels.append(s.tokens[s.resp_start :])
        parts.append(pad_support(s.targets, k))
    uld = [p.uld_mask if p.uld_mask is not None else np.zeros(len(p), np.float32) for p in parts]
    return Batch(
        inputs=inputs,
        positions=np.concatenate(positions).astype(np.int32),
        labels=np.concatenate(labels).astype(np.int32),
        targets=SoftTargets(
            **{f: np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS}, uld_mask=np.concatenate(uld)
        ),
    )


def pad_support(t: SoftTargets, k: int) -> SoftTargets:
    """Widen the support to k slots with -inf log-probs (they count for neither side)."""
    extra = k - t.ids.shape[1]
    if extra <= 0:
        return t
    n = t.ids.shape[0]
    ids = np.concatenate([t.ids, np.repeat(t.ids[:, :1], extra, axis=1)], axis=1)
    logp = np.concatenate([t.logp, np.full((n, extra), -np.inf, np.float32)], axis=1)
    return SoftTargets(ids, logp, t.tail, t.lse_t, t.kd_mask, t.uld_mask)
