"""What the student learns, per response token: the job's objective over sparse teacher targets.

    loss = alpha * (T^2 * D_T(teacher || student) [+ ULD rows]) / kd tokens + (1 - alpha) * CE / tokens

`kd_worker.engine.losses` holds the pure per-position math; this module runs it over a student's
hidden states: the LM head only on response positions, in chunks so no [N, V] array outlives
its chunk. Two paths compute the same objective:
- autodiff (any divergence): chunks recomputed in the backward pass (`mx.checkpoint`) past the
  memory budget;
- fused (forward KL with a frozen LM head, the default): one exp per logit serves loss and
  closed-form gradient in the forward pass (losses.forward_kl_ce_grad); nothing is recomputed.
Validation (`measure`, no gradient) evaluates one chunk at a time and takes KL and top-1
agreement from the same logits as the loss sums.

Memory is counted in chunks: [rows, V] float32 logits of LOSS_CHUNK_ELEMENTS (128 MiB). MLX
evaluates lazily and its CPU/GPU streams run ahead of the Python thread, so inside one graph
(the compiled training step) several chunks can be in flight; each path therefore takes as many
rows as keeps its whole head-and-loss working set near two chunks whatever N and V are
(measured by tests/unit/test_memory_peaks.py, reported by bench/realsize.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from jobs.config import KDConfig
from kd_worker.engine import losses
from kd_worker.engine.data import Batch
from kd_worker.engine.losses import Divergence, LossSums, Targets
from kd_worker.engine.models import LoadedModel, head_logits, logit_chunks

LOSS_CHUNK_ELEMENTS = 1 << 25  # [positions x vocab] floats per loss chunk (128 MiB of logits)
# Rows of the training step's passes, in parts of a chunk: a fused pass holds ~4 [rows, V] arrays
# (logits, exp, tempered exp, gradient) and the compiled step runs about two passes ahead of the
# compute, so a quarter chunk of rows keeps it near two chunks. (The autodiff path, only taken
# when the LM head itself trains, recomputes chunks backwards and is not bounded as tightly.)
FUSED_PARTS = 4
ULD_PARTS = 16  # ULD rows per pass (gathered, tempered, partitioned, differentiated), in parts of a chunk


def chunk_rows(n_vocab: int, parts: int = 1) -> int:
    """Positions per LM-head pass: `parts` passes make one chunk of LOSS_CHUNK_ELEMENTS logits."""
    return max(1, LOSS_CHUNK_ELEMENTS // max(n_vocab, 1) // parts)


def chunk_bytes(n_vocab: int) -> int:
    """Bytes of one chunk (the float32 logits of `chunk_rows(n_vocab)` positions)."""
    return chunk_rows(n_vocab) * n_vocab * 4


def to_mx_targets(b: Batch) -> Targets:
    t = b.targets
    return Targets(
        ids=mx.array(t.ids),
        logp=mx.array(t.logp),
        tail=mx.array(t.tail),
        lse_t=mx.array(t.lse_t),
        labels=mx.array(b.labels),
        kd_mask=mx.array(t.kd_mask),
    )


def scalar(v: mx.array) -> float:
    return float(cast(float, v.item()))


def _targets_rows(b: Batch, idx: np.ndarray) -> Targets:
    """The targets of rows `idx` of a batch, as MLX arrays."""
    t = b.targets
    fields = (t.ids, t.logp, t.tail, t.lse_t, b.labels, t.kd_mask)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:  # contiguous (the usual case): slices, no gather
        return Targets(*(mx.array(x[idx[0] : idx[-1] + 1]) for x in fields))
    return Targets(*(mx.array(x[idx]) for x in fields))


def uld_rows(b: Batch) -> mx.array:
    """Rows of the batch scored with ULD (cross-tokenizer positions without an alignment); often none."""
    m = b.targets.uld_mask
    return mx.array(np.zeros(0, np.int32) if m is None else np.flatnonzero(m > 0).astype(np.int32))


@dataclass(frozen=True)
class Objective:
    n_vocab: int  # logit columns of the student's head that are real tokens
    temperature: float = 2.0
    alpha: float = 0.7
    divergence: Divergence = "forward_kl"
    jsd_beta: float = 0.5
    uld_weight: float = 1.0  # ULD (cross-tokenizer, unaligned) rows relative to the per-token divergence

    @classmethod
    def from_config(cls, cfg: KDConfig, n_vocab: int) -> Objective:
        return cls(n_vocab, cfg.temperature, cfg.alpha, cfg.divergence, cfg.jsd_beta, cfg.xtok_uld_weight)

    # --- the objective's value -------------------------------------------------------------------
    def total(self, s: LossSums) -> mx.array:
        """The training loss from its sums (losses.combine)."""
        return losses.combine(s, self.temperature, self.alpha, self.uld_weight)

    def fused_applies(self, lm: LoadedModel) -> bool:
        """The fused path needs a frozen LM head (LoRA never adapts the head by default): the
        gradient then flows to the hidden states only, and is computed pass by pass."""
        head = getattr(lm.model, "lm_head", None) or lm.model.model.embed_tokens
        return not tree_flatten(head.trainable_parameters())

    def sums(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None = None) -> LossSums:
        """All loss sums for hidden states h [N, D] at the response positions (autodiff path)."""
        kd, ce, kd_n, n = self._head_sums(lm, h, t)
        return LossSums(kd, ce, kd_n, n, *self._uld_sums(lm, h, t, uld))

    def loss(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None = None) -> tuple[mx.array, LossSums]:
        """The training loss and its sums; fused when `fused_applies`, else autodiff over `sums`."""
        if not self.fused_applies(lm):
            sums = self.sums(lm, h, t, uld)
            return self.total(sums), sums
        uld = mx.zeros((0,), mx.int32) if uld is None else uld
        kd_n, n, uld_n = t.kd_mask.sum(), mx.array(float(h.shape[0])), mx.array(float(uld.shape[0]))
        denom = mx.maximum(kd_n + uld_n, 1.0)
        a, temp = self.alpha, self.temperature
        w = mx.stop_gradient(
            mx.stack([a * temp**2 / denom, (1.0 - a) / mx.maximum(n, 1.0), a * self.uld_weight / denom])
        )
        total, kd_sum, ce_sum, uld_sum = self._fused_head_loss(lm, h, t, uld, w)
        sg = mx.stop_gradient
        return total, LossSums(sg(kd_sum), sg(ce_sum), kd_n, n, sg(uld_sum), uld_n)

    def measure(self, lm: LoadedModel, b: Batch) -> np.ndarray:
        """Validation sums of one batch without a gradient, float64 [kd, ce, kd_n, n, kl at T=1,
        top-1 agreements, uld, uld_n]: one chunk of logits serves loss, KL and top-1 (and the ULD
        rows it holds), and is evaluated before the next is built."""
        tot = np.zeros(8)
        uld_mask = b.targets.uld_mask
        rows = chunk_rows(self.n_vocab)
        for idx, logits in logit_chunks(lm, b.inputs, b.positions, self.n_vocab, rows):
            t = _targets_rows(b, idx)
            sums = losses.validation_sums(logits, t, self.temperature, self.divergence, self.jsd_beta)
            mx.eval(*sums)
            tot[:6] += [scalar(v) for v in sums]
            local = np.zeros(0, np.int64) if uld_mask is None else np.flatnonzero(uld_mask[idx] > 0)
            step = max(1, rows // ULD_PARTS)  # ULD gathers, tempers and partitions its rows: smaller passes
            for s in range(0, local.size, step):
                sel = mx.array(local[s : s + step])
                d = losses.uld_distance(logits[sel], t.logp[sel], t.lse_t[sel], self.temperature).sum()
                tot[6:] += [scalar(d), float(min(step, local.size - s))]
        return tot

    def per_token(self, kd_sum: float, ce_sum: float, kd_n: float, n: float, uld_sum: float, uld_n: float) -> dict:
        """Per-token kd (at T), ce and the total, as the training loss weighs them."""
        kd, ce = kd_sum / max(kd_n, 1), ce_sum / max(n, 1)
        teach = (self.temperature**2 * kd_sum + self.uld_weight * uld_sum) / max(kd_n + uld_n, 1)
        return {"kd": kd, "ce": ce, "total": self.alpha * teach + (1 - self.alpha) * ce}

    # --- the LM head over response positions -----------------------------------------------------
    def _head_sums(self, lm: LoadedModel, h: mx.array, t: Targets) -> list[mx.array]:
        """[kd, ce, kd_n, n] through autodiff; past one chunk the head is recomputed in the backward pass."""

        def part(hc, ids, logp, tail, lse_t, labels, kd_mask):
            # mx.checkpoint differentiates w.r.t. every input; integer ids have no gradient
            ids, labels = mx.stop_gradient(ids), mx.stop_gradient(labels)
            logits = head_logits(lm, hc, self.n_vocab)
            s = losses.loss_sums(
                logits,
                Targets(ids, logp, tail, lse_t, labels, kd_mask),
                self.temperature,
                self.divergence,
                self.jsd_beta,
            )
            return list(s)[:4]

        n, chunk = h.shape[0], chunk_rows(self.n_vocab)
        if n <= chunk:
            return part(h, *t)
        fn = mx.checkpoint(part)
        acc = [mx.array(0.0)] * 4
        for s in range(0, n, chunk):
            hc = h[s : s + chunk] if s == 0 else mx.depends(h[s : s + chunk], acc)  # one pass after another
            acc = [a + b for a, b in zip(acc, fn(hc, *(x[s : s + chunk] for x in t)), strict=True)]
        return acc

    def _uld_sums(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None) -> tuple[mx.array, mx.array]:
        """ULD rows (cross-tokenizer, unaligned) get a second head pass in chunks; often there are none."""
        if uld is None or uld.shape[0] == 0:
            return mx.array(0.0), mx.array(0.0)
        temperature, n_vocab = self.temperature, self.n_vocab

        def part(hc, logp, lse_t):
            return losses.uld_distance(head_logits(lm, hc, n_vocab), logp, lse_t, temperature).sum()

        n, chunk = uld.shape[0], chunk_rows(self.n_vocab)
        fn = part if n <= chunk else mx.checkpoint(part)
        total = mx.array(0.0)
        for s in range(0, n, chunk):
            rows = uld[s : s + chunk]
            hc = h[rows] if s == 0 else mx.depends(h[rows], total)
            total = total + fn(hc, t.logp[rows], t.lse_t[rows])
        return total, mx.array(float(n))

    def _pass_grad(self, head: Callable[[mx.array], mx.array], hc: mx.array, t: Targets, w: mx.array) -> list[mx.array]:
        """[kd sum, ce sum, d(w0 * kd + w1 * ce)/d hc] of one pass: closed form for forward KL (one exp
        per logit, nothing recomputed), autodiff of the pass for the other divergences."""
        if self.divergence == "forward_kl":
            kl, ce, g = losses.forward_kl_ce_grad(head(hc), t, self.temperature, w[0], w[1])
            return [(kl * t.kd_mask).sum(), ce.sum(), mx.vjp(head, [hc], [g])[1][0]]

        def weighted(x: mx.array) -> list[mx.array]:
            s = losses.loss_sums(head(x), t, self.temperature, self.divergence, self.jsd_beta)
            return [w[0] * s.kd + w[1] * s.ce, s.kd, s.ce]

        (_, kd, ce), (dh,) = mx.vjp(weighted, [hc], [mx.array(1.0), mx.array(0.0), mx.array(0.0)])
        return [kd, ce, dh]

    def _fused_head_loss(
        self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array, w: mx.array
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """(w0 * kd + w1 * ce + w2 * uld, kd, ce, uld sums) with dL/dh computed in the forward pass,
        pass by pass: logits, loss and gradient of one pass, then dL/dh through the head. Each pass
        waits for the previous one (mx.depends), so the lazy graph cannot interleave their [rows, V]
        arrays, and nothing is recomputed backwards. ULD rows take a second, small head pass."""
        n_vocab, temperature, chunk = self.n_vocab, self.temperature, chunk_rows(self.n_vocab, FUSED_PARTS)
        uld_chunk = chunk_rows(self.n_vocab, ULD_PARTS)

        def head(hc: mx.array) -> mx.array:
            return head_logits(lm, hc, n_vocab)

        def uld_pass(x: mx.array, logp: mx.array, lse_t: mx.array, w2: mx.array) -> list[mx.array]:
            d = losses.uld_distance(head(x), logp, lse_t, temperature).sum()
            return [w2 * d, d]

        @mx.custom_function
        def fused(h, ids, logp, tail, lse_t, labels, kd_mask, uld, w):
            kd_sum, ce_sum, uld_sum = mx.array(0.0), mx.array(0.0), mx.array(0.0)
            dh: list[mx.array] = []
            after: list[mx.array] = []  # the previous pass's outputs
            for s in range(0, h.shape[0], chunk):
                hc = h[s : s + chunk] if not after else mx.depends(h[s : s + chunk], after)
                tc = Targets(*(x[s : s + hc.shape[0]] for x in (ids, logp, tail, lse_t, labels, kd_mask)))
                kd, ce, g = self._pass_grad(head, hc, tc, w)
                kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
                dh.append(g)
                after = [kd_sum, ce_sum, g]
            grad = mx.concatenate(dh)
            for s in range(0, uld.shape[0], uld_chunk):
                rows = uld[s : s + uld_chunk]
                hc = mx.depends(h[rows], after) if after else h[rows]
                part = partial(uld_pass, logp=logp[rows], lse_t=lse_t[rows], w2=w[2])
                (_, d), (g,) = mx.vjp(part, [hc], [mx.array(1.0), mx.array(0.0)])
                uld_sum = uld_sum + d
                grad = grad.at[rows].add(g)
                after = [uld_sum, g]
            return w[0] * kd_sum + w[1] * ce_sum + w[2] * uld_sum, kd_sum, ce_sum, uld_sum, grad

        @fused.vjp
        def fused_vjp(primals, cotangents, outputs):
            return (cotangents[0] * outputs[4],) + tuple(mx.zeros_like(p) for p in primals[1:])

        total, kd_sum, ce_sum, uld_sum, _ = cast(tuple[mx.array, ...], fused(h, *t, uld, w))
        return total, kd_sum, ce_sum, uld_sum
