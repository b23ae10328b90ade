"""What the student learns, per response token: the job's objective over sparse teacher targets.

    loss = alpha * (T^2 * D_T(teacher || student) [+ ULD rows]) / kd tokens + (1 - alpha) * CE / tokens

`kd_worker.engine.losses` holds the pure per-position math; this module runs it over a student's
hidden states: the LM head only on response positions, in chunks so no [N, V] array outlives
its chunk. Two paths compute the same objective:
- autodiff (any divergence): chunks recomputed in the backward pass (`mx.checkpoint`) past the
  memory budget;
- fused (forward KL with a frozen LM head, the default): one exp per logit serves loss and
  closed-form gradient in the forward pass (losses.forward_kl_ce_grad); nothing is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from jobs.config import KDConfig
from kd_worker.engine import losses
from kd_worker.engine.data import Batch
from kd_worker.engine.losses import Divergence, LossSums, Targets
from kd_worker.engine.models import LoadedModel, head_logits

LOSS_CHUNK_ELEMENTS = 1 << 25  # [positions x vocab] floats per loss chunk (128 MiB of logits)


def chunk_rows(n_vocab: int) -> int:
    """Positions per LM-head chunk: caps a chunk's [rows, V] logits at LOSS_CHUNK_ELEMENTS."""
    return max(1, LOSS_CHUNK_ELEMENTS // max(n_vocab, 1))


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
        """The fused path covers forward KL with a frozen LM head (LoRA never adapts the head by default)."""
        head = getattr(lm.model, "lm_head", None) or lm.model.model.embed_tokens
        return self.divergence == "forward_kl" and not tree_flatten(head.trainable_parameters())

    def sums(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None = None) -> LossSums:
        """All loss sums for hidden states h [N, D] at the response positions (autodiff path)."""
        kd, ce, kd_n, n = self._head_sums(lm, h, t)
        return LossSums(kd, ce, kd_n, n, *self._uld_sums(lm, h, t, uld))

    def loss(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None = None) -> tuple[mx.array, LossSums]:
        """The training loss and its sums; fused when `fused_applies`, else autodiff over `sums`."""
        if not self.fused_applies(lm):
            sums = self.sums(lm, h, t, uld)
            return self.total(sums), sums
        uld_sum, uld_n = self._uld_sums(lm, h, t, uld)
        kd_n, n = t.kd_mask.sum(), mx.array(float(h.shape[0]))
        denom = mx.maximum(kd_n + uld_n, 1.0)
        kd_w = mx.stop_gradient(self.alpha * self.temperature**2 / denom)
        ce_w = mx.stop_gradient((1.0 - self.alpha) / mx.maximum(n, 1.0))
        total, kl_sum, ce_sum = self._fused_head_loss(lm, h, t, kd_w, ce_w)
        loss = total + self.alpha * self.uld_weight * uld_sum / denom
        return loss, LossSums(mx.stop_gradient(kl_sum), mx.stop_gradient(ce_sum), kd_n, n, uld_sum, uld_n)

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
            acc = [a + b for a, b in zip(acc, fn(h[s : s + chunk], *(x[s : s + chunk] for x in t)), strict=True)]
        return acc

    def _uld_sums(self, lm: LoadedModel, h: mx.array, t: Targets, uld: mx.array | None) -> tuple[mx.array, mx.array]:
        """ULD rows (cross-tokenizer, unaligned) get a second, small head pass; often there are none."""
        if uld is None or uld.shape[0] == 0:
            return mx.array(0.0), mx.array(0.0)
        logits = head_logits(lm, h[uld], self.n_vocab)
        d = losses.uld_distance(logits, t.logp[uld], t.lse_t[uld], self.temperature)
        return d.sum(), mx.array(float(uld.shape[0]))

    def _fused_head_loss(
        self, lm: LoadedModel, h: mx.array, t: Targets, kd_w: mx.array, ce_w: mx.array
    ) -> tuple[mx.array, mx.array, mx.array]:
        """(kd_w * sum KL + ce_w * sum CE, sum KL, sum CE) with dL/dh computed in the forward pass:
        per chunk the logits, one exp, the loss and its closed-form logit gradient, then dL/dh
        through the head. No [N, V] array outlives its chunk and nothing is recomputed backwards."""
        n_vocab, temperature, chunk = self.n_vocab, self.temperature, chunk_rows(self.n_vocab)

        def head(hc):
            return head_logits(lm, hc, n_vocab)

        @mx.custom_function
        def fused(h, ids, logp, tail, lse_t, labels, kd_mask, kd_w, ce_w):
            kl_sum, ce_sum, dh = mx.array(0.0), mx.array(0.0), []
            for s in range(0, h.shape[0], chunk):
                hc = h[s : s + chunk]
                tc = Targets(*(x[s : s + hc.shape[0]] for x in (ids, logp, tail, lse_t, labels, kd_mask)))
                kl, ce, g = losses.forward_kl_ce_grad(head(hc), tc, temperature, kd_w, ce_w)
                kl_sum, ce_sum = kl_sum + (kl * tc.kd_mask).sum(), ce_sum + ce.sum()
                dh.append(mx.vjp(head, [hc], [g])[1][0])  # lazy: only the backward matmul is evaluated
            return kd_w * kl_sum + ce_w * ce_sum, kl_sum, ce_sum, mx.concatenate(dh)

        @fused.vjp
        def fused_vjp(primals, cotangents, outputs):
            return (cotangents[0] * outputs[3],) + tuple(mx.zeros_like(p) for p in primals[1:])

        total, kl_sum, ce_sum, _ = cast(tuple[mx.array, ...], fused(h, *t, kd_w, ce_w))
        return total, kl_sum, ce_sum
