"""Where the training loop's batches come from. The loop only calls `source.batch(step, model)`;
a source decides what the batch holds. Today's source is offline (the teacher's own responses);
an on-policy source (student rollouts scored by the teacher) plugs in the same way.

Contract: a source's batch at `step` is a pure function of (its data, seed, step) and, for
sources that sample from the model, of the model's weights at that step. Nothing may depend on
a global RNG or on how many batches were drawn before: that is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import mlx.nn as nn
import numpy as np

from kd_worker.engine.data import Batch, StudentSequence, collate


class BatchSource(Protocol):
    def batch(self, step: int, model: nn.Module) -> Batch:
        """The batch trained at `step` (0-based)."""
        ...


@runtime_checkable
class StatefulBatchSource(BatchSource, Protocol):
    """A source whose batches depend on more than (seed, step): e.g. rollouts sampled from the
    weights at an earlier step. The trainer saves `state()` with every checkpoint (under
    "batches.") and hands it back to `load_state` on resume, so resume stays exact."""

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, arrays: dict[str, np.ndarray]) -> None: ...


def batch_plan(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Length-sorted index groups (similar lengths share a batch: less padding)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    bs = max(1, min(batch_size, len(order)))
    return [order[i : i + bs] for i in range(0, len(order), bs)]


def batch_for_step(plan: list[np.ndarray], step: int, seed: int) -> np.ndarray:
    """Indices of the batch trained at `step` (0-based): a pure function of (seed, step)."""
    epoch, pos = divmod(step, len(plan))
    perm = np.random.default_rng([seed, epoch]).permutation(len(plan))
    return plan[perm[pos]]


class OfflineBatches:
    """Batches of fixed sequences (the teacher's responses with their targets): length-sorted
    groups, each epoch visiting them in a seeded permutation."""

    def __init__(self, seqs: Sequence[StudentSequence], batch_size: int, seed: int):
        self.seqs, self.seed = seqs, seed
        self.plan = batch_plan([len(s.tokens) for s in seqs], batch_size)

    def batch(self, step: int, model: nn.Module | None = None) -> Batch:
        return collate([self.seqs[i] for i in batch_for_step(self.plan, step, self.seed)])
