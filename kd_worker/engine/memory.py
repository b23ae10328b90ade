"""Memory: the budget a job must stay within, as a stop reason (engine.hooks)."""

from __future__ import annotations

import mlx.core as mx

from kd_worker.engine.hooks import Hooks, Stop


class MemoryBudget(Hooks):
    """Stops the job once MLX's peak memory since the job reset it (resident models included) is over
    `budget` bytes: a clear ResourceLimitExceeded instead of swapping or the OOM killer. Checked
    wherever the engine asks `should_stop` (between batches, steps and decode chunks)."""

    def __init__(self, budget: int):
        self.budget = budget

    def should_stop(self) -> Stop | None:
        peak = mx.get_peak_memory()
        if peak <= self.budget:
            return None
        return Stop(
            "memory",
            f"the job reached {peak:,} bytes of MLX memory (models included), over KD_MAX_JOB_MEMORY={self.budget:,}; "
            "lower batch_size, max_seq_length, gen_batch_size or gen_max_tokens, or raise the budget",
        )
