"""The memory-capping chunked loss path (LM head + loss recomputed per chunk) equals the direct one."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bench.step import BODY, batch, student
from kd_worker.engine import objective as OBJ
from kd_worker.engine.losses import agreement_sums, combine, loss_sums, uld_distance
from kd_worker.engine.models import head_logits, hidden_at


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_loss_and_gradients_equal_the_direct_path(monkeypatch, divergence):
    body = {**BODY, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 4}
    lm, cfg = student(300, body)
    cfg = cfg.model_copy(update={"divergence": divergence})
    obj = OBJ.Objective.from_config(cfg, 300)
    b, _, _ = batch(300, 2, 8, 24)
    x, pos, t = mx.array(b.inputs), mx.array(b.positions), OBJ.to_mx_targets(b)

    def run():
        def loss(model):
            return combine(obj.sums(lm, hidden_at(lm, x, pos), t), cfg.temperature, cfg.alpha)

        value, grads = nn.value_and_grad(lm.model, loss)(lm.model)
        return value.item(), dict(tree_flatten(grads))

    direct_v, direct_g = run()
    monkeypatch.setattr(OBJ, "LOSS_CHUNK_ELEMENTS", 300 * 7)  # 7 positions per chunk: 7 chunks of 48 rows
    chunked_v, chunked_g = run()
    assert chunked_v == pytest.approx(direct_v, rel=1e-5)
    for k in direct_g:
        np.testing.assert_allclose(np.array(chunked_g[k]), np.array(direct_g[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("budget", [None, 300 * 5])
def test_fused_training_loss_equals_the_autodiff_path(monkeypatch, divergence, temperature, budget):
    """The fused path (gradients w.r.t. the hidden states pass by pass, ULD rows included) equals
    autodiff over the loss sums, in value and in every LoRA gradient."""
    body = {**BODY, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 4}
    lm, cfg = student(300, body)
    cfg = cfg.model_copy(update={"temperature": temperature, "divergence": divergence})
    obj = OBJ.Objective.from_config(cfg, 300)
    b, _, _ = batch(300, 2, 8, 24, temperature=temperature)
    x, pos, t = mx.array(b.inputs), mx.array(b.positions), OBJ.to_mx_targets(b)
    uld = mx.array([1, 5, 6, 30, 47], mx.int32)  # cross-tokenizer rows scored with ULD
    if budget:
        monkeypatch.setattr(OBJ, "LOSS_CHUNK_ELEMENTS", budget)  # passes of 1 row: many passes and ULD passes

    def run(path):
        def loss(model):
            h = hidden_at(lm, x, pos)
            if path == "fused":
                return obj.loss(lm, h, t, uld)[0]
            return combine(obj.sums(lm, h, t, uld), cfg.temperature, cfg.alpha)

        value, grads = nn.value_and_grad(lm.model, loss)(lm.model)
        return value.item(), dict(tree_flatten(grads))

    assert obj.fused_applies(lm)
    (fv, fg), (av, ag) = run("fused"), run("autodiff")
    assert fv == pytest.approx(av, rel=1e-5)
    for k in ag:
        np.testing.assert_allclose(np.array(fg[k]), np.array(ag[k]), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_validation_in_chunks_equals_a_dense_reference(monkeypatch, split, temperature):
    """Validation sums (loss, KL at T=1, top-1, ULD rows) from chunks of logits, evaluated one by
    one, equal the dense computation over the whole batch; also for a model without a body/head
    split, whose full forward then runs one sequence at a time."""
    body = {**BODY, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 4}
    lm, cfg = student(300, body)
    cfg = cfg.model_copy(update={"temperature": temperature})
    obj = OBJ.Objective.from_config(cfg, 300)
    b, _, _ = batch(300, 3, 8, 24, temperature=temperature)
    b.targets.uld_mask = np.zeros(len(b.labels), np.float32)
    b.targets.uld_mask[[2, 3, 40, 71]] = 1.0
    b.targets.kd_mask[[2, 3, 40, 71]] = 0.0
    lm.model.eval()
    t = OBJ.to_mx_targets(b)
    logits = head_logits(lm, hidden_at(lm, mx.array(b.inputs), mx.array(b.positions)), 300)
    kd, ce, kd_n, n = (v.item() for v in loss_sums(logits, t, temperature)[:4])
    kl, top1 = (v.item() for v in agreement_sums(logits, t))
    rows = mx.array([2, 3, 40, 71])
    uld = uld_distance(logits[rows], t.logp[rows], t.lse_t[rows], temperature).sum().item()
    monkeypatch.setattr(OBJ, "LOSS_CHUNK_ELEMENTS", 300 * 7)  # 7 rows per chunk: 11 chunks
    chunked = obj.measure(lm if split else dataclasses.replace(lm, split=None), b)
    np.testing.assert_allclose(chunked, [kd, ce, kd_n, n, kl, top1, uld, 4], rtol=1e-5)
