"""The LoRA trainer: KD + CE on sparse teacher targets. No Redis, no paths, no environment.

Why not mlx-lm's `train(loss=..., iterate_batches=...)`: its loop cannot checkpoint or restore
the optimizer state (mlx-lm#535), its validation reports one loss where KD needs KD/CE/KL/top-1,
and it has no place to stop between steps for a cancel or a warm shutdown. Everything else is
mlx-lm's: `linear_to_lora_layers`, its adapter layout, `nn.value_and_grad`, and the compiled
step over `[model.state, optimizer.state]`.

Exact resume: the batch at step s is a pure function of (seed, s) (kd_worker.engine.data), the random
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
from jobs.errors import TrainingDiverged, raise_if_stopped
from kd_worker.engine import losses as L
from kd_worker.engine.data import Batch, Sequence_, batch_for_step, batch_plan, collate
from kd_worker.engine.models import LoadedModel, head_logits, hidden_at

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
    linear_to_lora_layers(model, lora_layer_count(model, cfg), cfg.lora_parameters())
    model.train()


def lora_layer_count(model: nn.Module, cfg: KDConfig) -> int:
    return len(model.layers) if cfg.lora_layers == -1 else min(cfg.lora_layers, len(model.layers))


def to_mx_targets(b: Batch) -> L.Targets:
    t = b.targets
    return L.Targets(
        ids=mx.array(t.ids),
        logp=mx.array(t.logp),
        tail=mx.array(t.tail),
        lse_t=mx.array(t.lse_t),
        labels=mx.array(b.labels),
        kd_mask=mx.array(t.kd_mask),
    )


def uld_rows(b: Batch) -> mx.array:
    """Rows of the batch scored with ULD (cross-tokenizer positions without an alignment); often none."""
    m = b.targets.uld_mask
    return mx.array(np.zeros(0, np.int32) if m is None else np.flatnonzero(m > 0).astype(np.int32))


def _chunk(n_vocab: int) -> int:
    return max(1, LOSS_CHUNK_ELEMENTS // max(n_vocab, 1))


def head_sums(lm: LoadedModel, h: mx.array, t: L.Targets, n_vocab: int, cfg: KDConfig) -> list[mx.array]:
    """[kd, ce, kd_n, n] sums through autodiff (any divergence). The LM head runs only on response
    positions, in chunks recomputed in the backward pass (mx.checkpoint) past the memory budget."""

    def part(hc, ids, logp, tail, lse_t, labels, kd_mask):
        # mx.checkpoint differentiates w.r.t. every input; integer ids have no gradient
        ids, labels = mx.stop_gradient(ids), mx.stop_gradient(labels)
        sums = L.loss_sums(
            head_logits(lm, hc, n_vocab),
            L.Targets(ids, logp, tail, lse_t, labels, kd_mask),
            cfg.temperature,
            cfg.divergence,
            cfg.jsd_beta,
        )
        return list(sums)[:4]

    n, chunk = h.shape[0], _chunk(n_vocab)
    if n <= chunk:
        return part(h, *t)
    fn = mx.checkpoint(part)
    acc = [mx.array(0.0)] * 4
    for s in range(0, n, chunk):
        acc = [a + b for a, b in zip(acc, fn(h[s : s + chunk], *(x[s : s + chunk] for x in t)), strict=True)]
    return acc


def uld_sums(
    lm: LoadedModel, h: mx.array, t: L.Targets, uld: mx.array | None, n_vocab: int, cfg: KDConfig
) -> tuple[mx.array, mx.array]:
    """ULD rows (cross-tokenizer, unaligned) get a second, small head pass; often there are none."""
    if uld is None or uld.shape[0] == 0:
        return mx.array(0.0), mx.array(0.0)
    d = L.uld_distance(head_logits(lm, h[uld], n_vocab), t.logp[uld], t.lse_t[uld], cfg.temperature)
    return d.sum(), mx.array(float(uld.shape[0]))


def sums_at(
    lm: LoadedModel, h: mx.array, t: L.Targets, n_vocab: int, cfg: KDConfig, uld: mx.array | None = None
) -> L.LossSums:
    """All loss sums for hidden states h at the response positions (autodiff path, any divergence)."""
    return L.LossSums(*head_sums(lm, h, t, n_vocab, cfg), *uld_sums(lm, h, t, uld, n_vocab, cfg))


def batch_sums(
    lm: LoadedModel,
    inputs: mx.array,
    positions: mx.array,
    t: L.Targets,
    n_vocab: int,
    cfg: KDConfig,
    uld: mx.array | None = None,
) -> L.LossSums:
    return sums_at(lm, hidden_at(lm, inputs, positions), t, n_vocab, cfg, uld)


def fused_ok(lm: LoadedModel, cfg: KDConfig) -> bool:
    """The fused path covers forward KL with a frozen LM head (LoRA never adapts the head by default)."""
    head = getattr(lm.model, "lm_head", None) or lm.model.model.embed_tokens
    return cfg.divergence == "forward_kl" and not tree_flatten(head.trainable_parameters())


def fused_head_loss(
    lm: LoadedModel, h: mx.array, t: L.Targets, n_vocab: int, cfg: KDConfig, kd_w: mx.array, ce_w: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """(kd_w * sum KL + ce_w * sum CE, sum KL, sum CE) with dL/dh computed in the forward pass:
    per chunk the logits, one exp, the loss and its closed-form logit gradient
    (losses.forward_kl_ce_grad), then dL/dh through the head. No [N, V] array outlives its chunk
    and nothing is recomputed in the backward pass (autodiff + checkpointing does it all twice)."""

    def head(hc):
        return head_logits(lm, hc, n_vocab)

    @mx.custom_function
    def fused(h, ids, logp, tail, lse_t, labels, kd_mask, kd_w, ce_w):
        kl_sum, ce_sum, dh = mx.array(0.0), mx.array(0.0), []
        for s in range(0, h.shape[0], _chunk(n_vocab)):
            hc = h[s : s + _chunk(n_vocab)]
            tc = L.Targets(*(x[s : s + hc.shape[0]] for x in (ids, logp, tail, lse_t, labels, kd_mask)))
            kl, ce, g = L.forward_kl_ce_grad(head(hc), tc, cfg.temperature, kd_w, ce_w)
            kl_sum, ce_sum = kl_sum + (kl * tc.kd_mask).sum(), ce_sum + ce.sum()
            dh.append(mx.vjp(head, [hc], [g])[1][0])  # lazy: only the backward matmul is evaluated
        return kd_w * kl_sum + ce_w * ce_sum, kl_sum, ce_sum, mx.concatenate(dh)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return (cotangents[0] * outputs[3],) + tuple(mx.zeros_like(p) for p in primals[1:])

    total, kl_sum, ce_sum, _ = fused(h, *t, kd_w, ce_w)
    return total, kl_sum, ce_sum


def train_loss(
    lm: LoadedModel, x: mx.array, pos: mx.array, t: L.Targets, n_vocab: int, cfg: KDConfig, uld: mx.array | None = None
) -> tuple[mx.array, L.LossSums]:
    """The training objective (losses.combine) and its sums; fused when the configuration allows."""
    h = hidden_at(lm, x, pos)
    if not fused_ok(lm, cfg):
        sums = sums_at(lm, h, t, n_vocab, cfg, uld)
        return L.combine(sums, cfg.temperature, cfg.alpha, cfg.xtok_uld_weight), sums
    uld_sum, uld_n = uld_sums(lm, h, t, uld, n_vocab, cfg)
    kd_n, n = t.kd_mask.sum(), mx.array(float(h.shape[0]))
    denom = mx.maximum(kd_n + uld_n, 1.0)
    kd_w = mx.stop_gradient(cfg.alpha * cfg.temperature**2 / denom)
    ce_w = mx.stop_gradient((1.0 - cfg.alpha) / mx.maximum(n, 1.0))
    total, kl_sum, ce_sum = fused_head_loss(lm, h, t, n_vocab, cfg, kd_w, ce_w)
    loss = total + cfg.alpha * cfg.xtok_uld_weight * uld_sum / denom
    return loss, L.LossSums(mx.stop_gradient(kl_sum), mx.stop_gradient(ce_sum), kd_n, n, uld_sum, uld_n)


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
        h = hidden_at(lm, x, pos)  # one body pass serves the loss sums and the agreement metrics
        sums = sums_at(lm, h, t, n_vocab, cfg, uld_rows(b))
        kl, top1 = L.agreement_sums(head_logits(lm, h, n_vocab), t)
        mx.eval(*sums, kl, top1)
        tot += [
            sums.kd.item(),
            sums.ce.item(),
            sums.kd_n.item(),
            sums.n.item(),
            kl.item(),
            top1.item(),
            sums.uld.item(),
            sums.uld_n.item(),
        ]
    if was_training:
        lm.model.train()
    kd_sum, ce_sum, kd_n, n, kl, top1, uld_sum, uld_n = tot
    kd, ce = kd_sum / max(kd_n, 1), ce_sum / max(n, 1)
    teach = (cfg.temperature**2 * kd_sum + cfg.xtok_uld_weight * uld_sum) / max(kd_n + uld_n, 1)
    out = {
        "kd": kd,
        "ce": ce,
        "total": cfg.alpha * teach + (1 - cfg.alpha) * ce,
        "kl": kl / max(kd_n, 1),
        "top1": top1 / max(kd_n, 1),
        "tokens": n,
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


def make_step(lm: LoadedModel, cfg: KDConfig, n_vocab: int, opt: optim.Optimizer):
    """The compiled training step (forward, KD+CE loss, backward, Adam update) and the state it
    carries: step(x, pos, targets_tuple, uld_rows) -> (loss, loss sums). bench/step.py times this."""
    model = lm.model

    def loss_fn(model, x, pos, t, uld):
        return train_loss(lm, x, pos, t, n_vocab, cfg, uld)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, pos, t, uld):
        (loss, sums), grads = value_and_grad(model, x, pos, L.Targets(*t), uld)
        opt.update(model, grads)
        return loss, tuple(sums)

    return step_fn, state


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
        return TrainResult(history, start, 0.0, 0)
    step_fn, state = make_step(lm, cfg, n_vocab, opt)

    t0, tokens, last_saved = time.perf_counter(), 0, start
    for step in range(start, cfg.iterations):
        if (reason := should_stop()) == "shutdown":
            store.save(step, _snapshot(model, opt), {"step": step, "history": history})
        raise_if_stopped(reason, f"at step {step} of {cfg.iterations}", "checkpoint saved, the job resumes")
        mx.random.seed(step_seed(cfg.seed, step))
        b = collate([train_seqs[i] for i in batch_for_step(plan, step, cfg.seed)])
        loss, sums = step_fn(mx.array(b.inputs), mx.array(b.positions), tuple(to_mx_targets(b)), uld_rows(b))
        mx.eval(state, loss, sums)
        sums = L.LossSums(*sums)
        done = step + 1
        _check_finite(loss.item(), done, cfg, last_saved)
        tokens += b.n_tokens
        rate = tokens / (time.perf_counter() - t0)
        row = {
            "step": done,
            "loss": loss.item(),
            "kd": sums.kd.item() / max(sums.kd_n.item(), 1),
            "ce": sums.ce.item() / max(sums.n.item(), 1),
            "tokens": b.n_tokens,
        }
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
    return TrainResult(history, start, time.perf_counter() - t0, tokens)
