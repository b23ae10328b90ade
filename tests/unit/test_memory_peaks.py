"""Peak memory of the LM head and loss does not grow with the vocabulary (issue 14, part 1).

At Qwen's vocabulary (151,936 embedding rows, 151,665 of them tokens) with a small body, MLX's own peak counter
(`mx.reset_peak_memory` / `mx.get_peak_memory`, exact bytes on the CPU backend) measures the body
alone and then the whole pass; the head and loss must add no more than a stated number of chunks
(objective.LOSS_CHUNK_ELEMENTS float32 logits) over the body, however many chunks the batch has.
The chunk is made small (13 rows) so a batch of 6 chunks stays fast; bench/realsize.py reports the
same peaks at the production chunk size."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from bench.realsize import N_TOKENS, V, added_peak, qwen_batch
from bench.realsize import PEAK_BODY as BODY
from bench.step import student
from jobs.config import KDConfig
from kd_worker.engine import objective as OBJ
from kd_worker.engine.models import hidden_at
from kd_worker.engine.trainer import make_step

CHUNK_ELEMENTS = 1 << 21  # 13 rows of 151,936 logits (7.5 MiB) per chunk
CHUNKS = 6  # response rows of the batch, in chunks
VALIDATION_CHUNKS = 2.0  # the bound for a validation pass
TRAIN_CHUNKS = 2.0  # "a few": what a training step's head and loss may add over the body's forward and backward


@pytest.fixture(scope="module")
def setup():
    lm, cfg = student(V, BODY)
    return lm, cfg


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(OBJ, "LOSS_CHUNK_ELEMENTS", CHUNK_ELEMENTS)


def chunk() -> int:
    return OBJ.chunk_bytes(N_TOKENS)


def test_validation_adds_at_most_two_chunks_over_the_body(setup):
    lm, cfg = setup
    b = qwen_batch(CHUNKS * OBJ.chunk_rows(N_TOKENS), uld_every=5)  # ULD rows are scored from the same chunks
    obj = OBJ.Objective.from_config(cfg, N_TOKENS)
    x, pos = mx.array(b.inputs), mx.array(b.positions)
    lm.model.eval()
    body = added_peak(lambda: hidden_at(lm, x, pos))
    whole = added_peak(lambda: mx.array(obj.measure(lm, b)))
    lm.model.train()
    print(f"validation: body {body / chunk():.2f} chunks, body+head+loss {whole / chunk():.2f} chunks")
    assert whole <= body + VALIDATION_CHUNKS * chunk()


@pytest.mark.parametrize(("divergence", "uld_every"), [("forward_kl", 7), ("jsd", 0)])
def test_training_step_head_and_loss_add_a_few_chunks_over_the_body(setup, divergence, uld_every):
    """Forward KL (closed-form passes) with ULD rows (autodiff passes), and JSD (autodiff passes)."""
    lm, cfg = setup
    b = qwen_batch(CHUNKS * OBJ.chunk_rows(N_TOKENS), uld_every=uld_every)
    obj = OBJ.Objective.from_config(KDConfig(lora_layers=-1, divergence=divergence), N_TOKENS)
    x, pos, t, uld = mx.array(b.inputs), mx.array(b.positions), tuple(OBJ.to_mx_targets(b)), OBJ.uld_rows(b)
    body_grad = nn.value_and_grad(lm.model, lambda m: hidden_at(lm, x, pos).sum())
    body = added_peak(lambda: body_grad(lm.model))
    step, state = make_step(lm, obj, optim.Adam(learning_rate=1e-5))
    whole = added_peak(lambda: [state, step(x, pos, t, uld)])
    print(f"training step ({divergence}): body {body / chunk():.2f} chunks, whole {whole / chunk():.2f} chunks")
    assert whole <= body + TRAIN_CHUNKS * chunk()
