"""The LoRA training loop: `train(student, batches, objective, store, hooks, schedule, val)`.
No Redis, no paths, no environment.

Seams (after mlx-lm's `train(..., loss=, iterate_batches=, training_callback=)`):
- `batches` (engine.batches.BatchSource) decides what each step trains on; a batch may name its
  own objective (an on-policy batch), each objective gets its own compiled step;
- `objective` (engine.objective.Objective) computes the loss;
- `hooks` (engine.hooks.Hooks) hear every step and validation and are asked, between steps and
  validation batches, whether to stop (cancel, warm shutdown, memory budget);
- `store` keeps checkpoints.

Why not mlx-lm's own loop: it cannot checkpoint or restore the optimizer state (mlx-lm#535), its
validation reports one loss where KD needs KD/CE/KL/top-1, and it has no place to stop between
steps. Everything else is mlx-lm's: `linear_to_lora_layers`, its adapter layout,
`nn.value_and_grad`, and the compiled step over `[model.state, optimizer.state]`.

Exact resume: the batch at step s is a pure function of (seed, s) (the BatchSource contract), the
random state is re-seeded from (seed, s) before every step, and a checkpoint holds adapter
weights, the full Adam state, the step and, for a source with state (`StatefulBatchSource`: the
on-policy rollout buffer), that state under "batches."; a run resumed at step 100 of 200 replays
steps 101..200 bit for bit.

Early end: a "converged" stop reason (patience, engine.selection) ends the loop normally after a
checkpoint; every other stop reason raises the job's error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import structlog
from mlx.utils import tree_flatten, tree_unflatten

from jobs.config import KDConfig
from jobs.errors import TrainingDiverged
from kd_worker.engine import losses
from kd_worker.engine.batches import BatchSource, StatefulBatchSource, batch_plan
from kd_worker.engine.data import StudentSequence, collate
from kd_worker.engine.hooks import Hooks, Progress, check_stop, raise_for_stop
from kd_worker.engine.models import LoadedModel, hidden_at
from kd_worker.engine.objective import Objective, to_mx_targets, uld_rows
from kd_worker.engine.types import TrainResult

log = structlog.get_logger(__name__)

StepFn = Callable[..., Any]


class CheckpointStore(Protocol):
    def save(self, step: int, arrays: dict[str, mx.array], state: dict[str, Any]) -> None: ...
    def latest(self) -> tuple[int, dict[str, mx.array], dict[str, Any]] | None: ...


@dataclass(frozen=True)
class TrainSchedule:
    """How long and how the loop runs; the job's KDConfig decides it."""

    iterations: int
    learning_rate: float
    seed: int
    val_every: int
    save_every: int
    eval_batch_size: int

    @classmethod
    def from_config(cls, cfg: KDConfig) -> TrainSchedule:
        return cls(cfg.iterations, cfg.learning_rate, cfg.seed, cfg.val_every, cfg.save_every, cfg.batch_size)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


def attach_lora(model: nn.Module, cfg: KDConfig) -> None:
    """Freeze the base and add mlx-lm LoRA layers (deterministic init from the job seed)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(cfg.seed)
    model.freeze()
    linear_to_lora_layers(model, lora_layer_count(model, cfg), cfg.lora_parameters())
    model.train()


def lora_layer_count(model: nn.Module, cfg: KDConfig) -> int:
    n_layers = len(model.layers)  # mlx-lm models expose their blocks as `layers`
    return n_layers if cfg.lora_layers == -1 else min(cfg.lora_layers, n_layers)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def evaluate(
    lm: LoadedModel, seqs: Sequence[StudentSequence], objective: Objective, batch_size: int, hooks: Hooks | None = None
) -> dict[str, float]:
    """Held-out KD (at T), CE, total, KL to the teacher at T=1 and top-1 agreement, per token.
    Asks `hooks` whether to stop after each batch."""
    if not seqs:
        return {}
    was_training = lm.model.training
    lm.model.eval()
    tot = np.zeros(8)
    for idx in batch_plan([len(s.tokens) for s in seqs], batch_size):
        # one body pass, then the head chunk by chunk: loss sums, KL and top-1 from the same logits
        tot += objective.measure(lm, collate([seqs[i] for i in idx]))
        if hooks is not None:
            check_stop(hooks, "during validation", "the job resumes from its last checkpoint")
    if was_training:
        lm.model.train()
    kd_sum, ce_sum, kd_n, n, kl_sum, top1_sum, uld_sum, uld_n = tot
    out = {
        **objective.per_token(kd_sum, ce_sum, kd_n, n, uld_sum, uld_n),
        "kl": kl_sum / max(kd_n, 1),
        "top1": top1_sum / max(kd_n, 1),
        "tokens": n,
    }
    if uld_n:  # cross-tokenizer runs: unaligned positions and the share aligned (KL/top-1 are over aligned ones)
        out.update(uld=uld_sum / uld_n, aligned=kd_n / max(n, 1))
    return out


def scalar(v: mx.array | float) -> float:
    return float(cast(float, v.item())) if isinstance(v, mx.array) else float(v)


def snapshot(model: nn.Module, opt: optim.Optimizer, batches: BatchSource | None = None) -> dict[str, mx.array]:
    arrays = {f"adapter.{k}": v for k, v in adapter_weights(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in dict(tree_flatten(opt.state)).items()})
    if isinstance(batches, StatefulBatchSource):  # e.g. the on-policy rollout buffer in use
        arrays.update({f"batches.{k}": mx.array(v) for k, v in batches.state().items()})
    return arrays


def restore(
    model: nn.Module, opt: optim.Optimizer, arrays: dict[str, mx.array], batches: BatchSource | None = None
) -> None:
    model.load_weights([(k[8:], v) for k, v in arrays.items() if k.startswith("adapter.")], strict=False)
    opt.state = tree_unflatten([(k[10:], v) for k, v in arrays.items() if k.startswith("optimizer.")])
    if isinstance(batches, StatefulBatchSource):
        batches.load_state({k[8:]: np.array(v) for k, v in arrays.items() if k.startswith("batches.")})


def _check_finite(value: float, step: int, learning_rate: float, last_saved: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"the loss became {value} at step {step} (learning_rate={learning_rate}); the last good "
            f"checkpoint is step {last_saved}; lower learning_rate, e.g. --set learning_rate={learning_rate / 10:g}"
        )


def make_step(lm: LoadedModel, objective: Objective, opt: optim.Optimizer) -> tuple[StepFn, list[Any]]:
    """The compiled training step (forward, loss, backward, Adam update) and the state it carries:
    step(x, pos, targets_tuple, uld_rows) -> (loss, loss sums). bench/step.py times this."""
    model = lm.model

    def loss_fn(model, x, pos, t, uld):
        return objective.loss(lm, hidden_at(lm, x, pos), t, uld)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, pos, t, uld):
        (loss, sums), grads = value_and_grad(model, x, pos, losses.Targets(*t), uld)
        opt.update(model, grads)
        return loss, tuple(sums)

    return step_fn, state


def train(
    student: LoadedModel,
    batches: BatchSource,
    objective: Objective,
    store: CheckpointStore,
    hooks: Hooks,
    schedule: TrainSchedule,
    val: Sequence[StudentSequence],
) -> TrainResult:
    """Train the LoRA layers already attached to student.model; resumes from `store` when it holds a checkpoint."""
    model, iterations = student.model, schedule.iterations
    opt = optim.Adam(learning_rate=schedule.learning_rate)
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}

    def validate(step: int) -> None:
        # a stop during validation resumes from the last checkpoint: the history stays exact
        metrics = evaluate(student, val, objective, schedule.eval_batch_size, hooks)
        history["val"].append({"step": step, **metrics})
        hooks.on_eval(step, metrics)

    start = 0
    if (resumed := store.latest()) is not None:
        start, arrays, state = resumed
        restore(model, opt, arrays, batches)
        history = state["history"]
        log.info("training_resumed", step=start, of=iterations)
    else:
        validate(0)
    if start >= iterations:
        return TrainResult(history, start, 0.0, 0)
    steps: dict[Objective, tuple[StepFn, list[Any]]] = {}

    t0, tokens, last_saved = time.perf_counter(), 0, start
    for step in range(start, iterations):
        stop = hooks.should_stop()
        converged = stop is not None and stop.kind == "converged"
        if stop is not None and (stop.kind == "shutdown" or (converged and last_saved != step)):
            store.save(step, snapshot(model, opt, batches), {"step": step, "history": history})
        if converged:  # a normal early end (patience ran out): saved above, no error
            log.info("training_converged", step=step, of=iterations, detail=stop.detail if stop else "")
            break
        raise_for_stop(stop, f"at step {step} of {iterations}", "checkpoint saved, the job resumes")
        mx.random.seed(step_seed(schedule.seed, step))
        b = batches.batch(step, model)
        b_objective = b.objective or objective
        if b_objective not in steps:
            steps[b_objective] = make_step(student, b_objective, opt)
        step_fn, carried = steps[b_objective]
        loss, sums = step_fn(mx.array(b.inputs), mx.array(b.positions), tuple(to_mx_targets(b)), uld_rows(b))
        mx.eval(carried, loss, sums)
        kd, ce, kd_n, n, uld, uld_n = (scalar(v) for v in sums)
        done = step + 1
        _check_finite(scalar(loss), done, schedule.learning_rate, last_saved)
        tokens += b.n_tokens
        rate = tokens / (time.perf_counter() - t0)
        row = {
            "step": done,
            "loss": scalar(loss),
            "kd": kd / max(kd_n, 1),
            "ce": ce / max(n, 1),
            "tokens": b.n_tokens,
            **b.info,
        }
        if uld_n:
            row["uld"] = uld / uld_n
        history["train"].append(row)
        hooks.on_step(done, row)
        if done % schedule.val_every == 0 or done == iterations:
            validate(done)
        if done % schedule.save_every == 0 or done == iterations:
            store.save(done, snapshot(model, opt, batches), {"step": done, "history": history})
            last_saved = done
        eta = (time.perf_counter() - t0) / (done - start) * (iterations - done)
        hooks.on_progress(Progress("train", done, iterations, {k: row[k] for k in ("loss", "kd", "ce")}, rate, eta))
    return TrainResult(history, start, time.perf_counter() - t0, tokens)
