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


def stream_rows(n: int, start: int, count: int, seed: int, stream: int) -> np.ndarray:
    """Rows [start, start + count) of an endless stream over n items: epoch after epoch, each a
    permutation from rng(seed, stream, epoch). Every item is visited once per epoch."""
    pos = np.arange(start, start + count)
    epochs = pos // n
    out = np.empty(count, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, stream, int(e)]).permutation(n)
        out[epochs == e] = perm[pos[epochs == e] % n]
    return out


class ReplayBatches:
    """The continual loop's batches: a `share` of every batch's rows comes from the domain's
    history (replayed corpus examples), the rest from the job's own data.

    Step s holds floor((s+1)·share·B) - floor(s·share·B) replayed rows (= round(share·B) whenever
    share·B is whole, and the exact share on average when it is not, e.g. at batch_size 1). The
    rows of each kind are consecutive positions of their own endless stream of seeded epoch
    permutations (`stream_rows`): a pure function of (seed, step), however batches were drawn
    before, so a resumed run trains the same batches."""

    def __init__(
        self,
        new: Sequence[StudentSequence],
        replay: Sequence[StudentSequence],
        batch_size: int,
        share: float,
        seed: int,
    ):
        if not new or not replay or not 0.0 < share < 1.0:
            raise ValueError("ReplayBatches needs new and replayed sequences and 0 < share < 1")
        self.new, self.replay, self.seed = new, replay, seed
        self.batch_size, self.share = batch_size, share

    def replayed_before(self, step: int) -> int:
        """Replayed rows in steps [0, step)."""
        return int(np.floor(step * self.share * self.batch_size + 1e-9))

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices into `new`, indices into `replay`) of the batch trained at `step`."""
        r0, r1 = self.replayed_before(step), self.replayed_before(step + 1)
        n0 = step * self.batch_size - r0
        n_new = self.batch_size - (r1 - r0)
        return (
            stream_rows(len(self.new), n0, n_new, self.seed, 0),
            stream_rows(len(self.replay), r0, r1 - r0, self.seed, 1),
        )

    def batch(self, step: int, model: nn.Module | None = None) -> Batch:
        new, old = self.rows(step)
        b = collate([self.new[i] for i in new] + [self.replay[i] for i in old])
        b.info["replay_rows"] = float(len(old))
        return b


def training_batches(
    new: Sequence[StudentSequence], replay: Sequence[StudentSequence], batch_size: int, share: float, seed: int
) -> BatchSource:
    """Today's offline batches when there is nothing to replay (or share 0): a first job, or
    `replay=0`, trains exactly as before the continual loop existed."""
    if not replay or share <= 0.0:
        return OfflineBatches(new, batch_size, seed)
    return ReplayBatches(new, replay, batch_size, share, seed)
