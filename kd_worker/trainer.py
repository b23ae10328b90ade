"""The LoRA trainer: KD + CE on sparse teacher targets. No Redis, no paths, no environment.

Why not mlx-lm's `train(loss=..., iterate_batches=...)`: its loop cannot checkpoint or restore
the optimizer state (mlx-lm#535), its validation reports one loss where KD needs KD/CE/KL/top-1,
and it has no place to stop between steps for a cancel or a warm shutdown. Everything else is
mlx-lm's: `linear_to_lora_layers`, its adapter layout, `nn.value_and_grad`, and the compiled
step over `[model.state, optimizer.state]`.

Exact resume: the batch at step s is a pure function of (seed, s) (kd_worker.data), the random
state is re-seeded from (seed, s) before every step, and a checkpoint holds adapter weights,
the full Adam state and the step; a run resumed at step 100 of 200 replays steps 101..200
bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import structlog
from mlx.utils import tree_flatten, tree_unflatten

from jobs.config import KDConfig
from jobs.errors import JobCanceled, JobInterrupted, TrainingDiverged
from kd_worker import losses as L
from kd_worker.data import Batch, Sequence_, batch_for_step, batch_plan, collate
from kd_worker.models import LoadedModel, head_logits, hidden_at

log = structlog.get_logger(__name__)

LOSS_CHUNK_ELEMENTS = 1 << 25  # [positions x vocab] floats per loss chunk (128 MiB of logits)


@dataclass(frozen=True)
class Progress:
    phase: str  # "generate" | "score" | "train" | "validate" | "publish"
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None
    eta_s: float | None = None


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], str | None]  # None, "cancel" or "shutdown"


class CheckpointStore(Protocol):
    def save(self, step: int, arrays: dict[str, mx.array], state: dict[str, Any]) -> None: ...
    def latest(self) -> tuple[int, dict[str, mx.array], dict[str, Any]] | None: ...


@dataclass
class TrainResult:
    history: dict[str, list[dict[str, float]]]
    steps: int
    resumed_from: int
    seconds: float
    tokens: int


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


def attach_lora(model: nn.Module, cfg: KDConfig) -> None:
    """Freeze the base and add mlx-lm LoRA layers (deterministic init from the job seed)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(cfg.seed)
    model.freeze()
    layers = len(model.layers) if cfg.lora_layers == -1 else min(cfg.lora_layers, len(model.layers))
    linear_to_lora_layers(model, layers, cfg.lora_parameters())
    model.train()


def lora_layer_count(model: nn.Module, cfg: KDConfig) -> int:
    return len(model.layers) if cfg.lora_layers == -1 else min(cfg.lora_layers, len(model.layers))


def to_mx_targets(b: Batch) -> L.Targets:
    t = b.targets
    return L.Targets(
        ids=mx.array(t.ids), logp=mx.array(t.logp), tail=mx.array(t.tail), lse_t=mx.array(t.lse_t),
        labels=mx.array(b.labels), kd_mask=mx.array(t.kd_mask),
    )


def uld_rows(b: Batch) -> mx.array:
    """Rows of the batch scored with ULD (cross-tokenizer positions without an alignment); often none."""
    m = b.targets.uld_mask
    return mx.array(np.zeros(0, np.int32) if m is None else np.flatnonzero(m > 0).astype(np.int32))


def batch_sums(lm: LoadedModel, inputs: mx.array, positions: mx.array, t: L.Targets, n_vocab: int, cfg: KDConfig,
               uld: mx.array | None = None) -> L.LossSums:
    """Loss sums for one batch. The LM head runs only on response positions, in chunks that are
    recomputed in the backward pass (mx.checkpoint) once [positions, V] would exceed the budget.
    `uld` rows get a second, small head pass: the student's top-k runs on them alone."""
    h = hidden_at(lm, inputs, positions)
    n = h.shape[0]
    chunk = max(1, LOSS_CHUNK_ELEMENTS // max(n_vocab, 1))

    def part(hc, ids, logp, tail, lse_t, labels, kd_mask):
        sums = L.loss_sums(head_logits(lm, hc, n_vocab), L.Targets(ids, logp, tail, lse_t, labels, kd_mask),
                           cfg.temperature, cfg.divergence, cfg.jsd_beta)
        return list(sums)[:4]

    if n <= chunk:
        acc = part(h, *t)
    else:
        fn = mx.checkpoint(part)
        acc = [mx.array(0.0)] * 4
        for s in range(0, n, chunk):
            acc = [a + b for a, b in zip(acc, fn(h[s : s + chunk], *(x[s : s + chunk] for x in t)))]
    if uld is None or uld.shape[0] == 0:
        return L.LossSums(*acc, uld=mx.array(0.0), uld_n=mx.array(0.0))
    d = L.uld_distance(head_logits(lm, h[uld], n_vocab), t.logp[uld], t.lse_t[uld], cfg.temperature)
    return L.LossSums(*acc, uld=d.sum(), uld_n=mx.array(float(uld.shape[0])))


def evaluate(lm: LoadedModel, seqs: Sequence[Sequence_], cfg: KDConfig, n_vocab: int) -> dict[str, float]:
    """Held-out KD (at T), CE, total, KL to the teacher at T=1 and top-1 agreement, per token."""
    if not seqs:
        return {}
    was_training = lm.model.training
    lm.model.eval()
    tot = np.zeros(8)
    for idx in batch_plan([len(s.tokens) for s in seqs], cfg.batch_size):
        b = collate([seqs[i] for i in idx])
        x, pos, t = mx.array(b.inputs), mx.array(b.positions), to_mx_targets(b)
        sums = batch_sums(lm, x, pos, t, n_vocab, cfg, uld_rows(b))
        kl, top1 = L.agreement_sums(head_logits(lm, hidden_at(lm, x, pos), n_vocab), t)
        mx.eval(*sums, kl, top1)
        tot += [sums.kd.item(), sums.ce.item(), sums.kd_n.item(), sums.n.item(), kl.item(), top1.item(),
                sums.uld.item(), sums.uld_n.item()]
    if was_training:
        lm.model.train()
    kd_sum, ce_sum, kd_n, n, kl, top1, uld_sum, uld_n = tot
    kd, ce = kd_sum / max(kd_n, 1), ce_sum / max(n, 1)
    teach = (cfg.temperature**2 * kd_sum + cfg.xtok_uld_weight * uld_sum) / max(kd_n + uld_n, 1)
    out = {
        "kd": kd, "ce": ce,
        "total": cfg.alpha * teach + (1 - cfg.alpha) * ce,
        "kl": kl / max(kd_n, 1), "top1": top1 / max(kd_n, 1), "tokens": n,
    }
    if uld_n:  # cross-tokenizer runs: unaligned positions and the share aligned (KL/top-1 are over aligned ones)
        out.update(uld=uld_sum / uld_n, aligned=kd_n / max(n, 1))
    return out


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def _snapshot(model: nn.Module, opt: optim.Optimizer) -> dict[str, mx.array]:
    arrays = {f"adapter.{k}": v for k, v in adapter_weights(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(opt.state)})
    return arrays


def _restore(model: nn.Module, opt: optim.Optimizer, arrays: dict[str, mx.array]) -> None:
    model.load_weights([(k[8:], v) for k, v in arrays.items() if k.startswith("adapter.")], strict=False)
    opt.state = tree_unflatten([(k[10:], v) for k, v in arrays.items() if k.startswith("optimizer.")])


def _check_finite(value: float, step: int, cfg: KDConfig, last_saved: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"the loss became {value} at step {step} (learning_rate={cfg.learning_rate}); the last good "
            f"checkpoint is step {last_saved}; lower learning_rate, e.g. --set learning_rate={cfg.learning_rate / 10:g}"
        )


def train(
    lm: LoadedModel,
    cfg: KDConfig,
    train_seqs: Sequence[Sequence_],
    val_seqs: Sequence[Sequence_],
    n_vocab: int,
    store: CheckpointStore,
    progress: ProgressFn,
    should_stop: StopFn,
) -> TrainResult:
    """Train the LoRA layers already attached to lm.model; resumes from `store` when it holds a checkpoint."""
    model = lm.model
    opt = optim.Adam(learning_rate=cfg.learning_rate)
    plan = batch_plan([len(s.tokens) for s in train_seqs], cfg.batch_size)
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    start = 0
    if (resumed := store.latest()) is not None:
        start, arrays, state = resumed
        _restore(model, opt, arrays)
        history = state["history"]
        log.info("training_resumed", step=start, of=cfg.iterations)
    else:
        history["val"].append({"step": 0, **evaluate(lm, val_seqs, cfg, n_vocab)})
    if start >= cfg.iterations:
        return TrainResult(history, start, start, 0.0, 0)

    def loss_fn(model, x, pos, t, uld):
        sums = batch_sums(lm, x, pos, t, n_vocab, cfg, uld)
        return L.combine(sums, cfg.temperature, cfg.alpha, cfg.xtok_uld_weight), sums

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, pos, t, uld):
        (loss, sums), grads = value_and_grad(model, x, pos, L.Targets(*t), uld)
        opt.update(model, grads)
        return loss, tuple(sums)

    t0, tokens, last_saved = time.perf_counter(), 0, start
    for step in range(start, cfg.iterations):
        if (reason := should_stop()) is not None:
            if reason == "shutdown":
                store.save(step, _snapshot(model, opt), {"step": step, "history": history})
                raise JobInterrupted(f"interrupted for shutdown at step {step}; checkpoint saved, the job resumes")
            raise JobCanceled(f"canceled at step {step} of {cfg.iterations}")
        mx.random.seed(step_seed(cfg.seed, step))
        b = collate([train_seqs[i] for i in batch_for_step(plan, step, cfg.seed)])
        loss, sums = step_fn(mx.array(b.inputs), mx.array(b.positions), tuple(to_mx_targets(b)), uld_rows(b))
        mx.eval(state, loss, sums)
        sums = L.LossSums(*sums)
        done = step + 1
        _check_finite(loss.item(), done, cfg, last_saved)
        tokens += b.n_tokens
        rate = tokens / (time.perf_counter() - t0)
        row = {"step": done, "loss": loss.item(), "kd": sums.kd.item() / max(sums.kd_n.item(), 1),
               "ce": sums.ce.item() / max(sums.n.item(), 1), "tokens": b.n_tokens}
        if sums.uld_n.item():
            row["uld"] = sums.uld.item() / sums.uld_n.item()
        history["train"].append(row)
        if done % cfg.val_every == 0 or done == cfg.iterations:
            history["val"].append({"step": done, **evaluate(lm, val_seqs, cfg, n_vocab)})
        if done % cfg.save_every == 0 or done == cfg.iterations:
            store.save(done, _snapshot(model, opt), {"step": done, "history": history})
            last_saved = done
        eta = (time.perf_counter() - t0) / (done - start) * (cfg.iterations - done)
        progress(Progress("train", done, cfg.iterations, {k: row[k] for k in ("loss", "kd", "ce")}, rate, eta))
    return TrainResult(history, cfg.iterations, start, time.perf_counter() - t0, tokens)
