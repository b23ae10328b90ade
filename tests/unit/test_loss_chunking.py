"""The memory-capping chunked loss path (LM head + loss recomputed per chunk) equals the direct one."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bench.step import BODY, batch, student
from kd_worker.engine import objective as OBJ
from kd_worker.engine.losses import combine
from kd_worker.engine.models import hidden_at


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


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("budget", [None, 300 * 5])
def test_fused_training_loss_equals_the_autodiff_path(monkeypatch, temperature, budget):
    body = {**BODY, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128, "num_attention_heads": 4}
    lm, cfg = student(300, body)
    cfg = cfg.model_copy(update={"temperature": temperature})
    obj = OBJ.Objective.from_config(cfg, 300)
    b, _, _ = batch(300, 2, 8, 24, temperature=temperature)
    x, pos, t = mx.array(b.inputs), mx.array(b.positions), OBJ.to_mx_targets(b)
    if budget:
        monkeypatch.setattr(OBJ, "LOSS_CHUNK_ELEMENTS", budget)

    def run(path):
        def loss(model):
            if path == "fused":
                return obj.loss(lm, hidden_at(lm, x, pos), t)[0]
            return combine(obj.sums(lm, hidden_at(lm, x, pos), t), cfg.temperature, cfg.alpha)

        value, grads = nn.value_and_grad(lm.model, loss)(lm.model)
        return value.item(), dict(tree_flatten(grads))

    assert obj.fused_applies(lm)
    (fv, fg), (av, ag) = run("fused"), run("autodiff")
    assert fv == pytest.approx(av, rel=1e-5)
    for k in ag:
        np.testing.assert_allclose(np.array(fg[k]), np.array(ag[k]), rtol=2e-3, atol=1e-6)
