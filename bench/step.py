"""Training step: our KD step vs mlx-lm's own LoRA SFT step, same student, batch and LoRA.

ours     kd_worker.engine.trainer.make_step (the production step): body on all positions, LM head and
         KD+CE loss on response positions only, sparse top-k targets (k=64, T=2)
mlx-lm   mlx_lm.tuner.trainer.default_loss under mlx-lm's compiled step (value_and_grad + Adam)
Components (forward+backward, LoRA gradients): body alone, body + LM head, and the loss as the
rest. Also covers benchmark 4 (step time and memory as V grows at a fixed body).

    .venv/bin/python -m bench.step [--vocab 2048 32000 151936] [--batch 4] [--prompt 128] [--response 128]
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from bench.common import best_of, report

BODY = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "intermediate_size": 1408,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


def student(vocab: int, body: dict):
    """A Qwen2-shaped student with LoRA on all layers, wrapped as the engine's LoadedModel."""
    import mlx.core as mx
    from mlx_lm.models import qwen2

    from jobs.config import KDConfig
    from kd_worker.engine.models import LoadedModel, split_model
    from kd_worker.engine.trainer import attach_lora

    mx.random.seed(0)
    args = qwen2.ModelArgs(model_type="qwen2", rms_norm_eps=1e-6, vocab_size=vocab, tie_word_embeddings=True, **body)
    model = qwen2.Model(args)
    model.set_dtype(mx.float32)
    cfg = KDConfig(lora_layers=-1)
    attach_lora(model, cfg)
    mx.eval(model.parameters())
    return LoadedModel(Path("."), model, None, "", "", vocab, vocab, split_model(model)), cfg


def batch(vocab: int, b: int, prompt: int, response: int, k: int = 64, temperature: float = 2.0):
    """A training batch with random sparse teacher targets (numpy, like kd_worker.engine.data.collate)."""
    import numpy as np

    from kd_worker.engine.data import Batch, SoftTargets

    rng = np.random.default_rng(0)
    length = prompt + response
    tokens = rng.integers(0, vocab, (b, length)).astype(np.int32)
    inputs = tokens[:, :-1]
    pos = np.concatenate([i * (length - 1) + prompt - 1 + np.arange(response) for i in range(b)]).astype(np.int32)
    labels = tokens[:, prompt:].reshape(-1)
    n = b * response
    logits = rng.normal(0, 3, (n, vocab)).astype(np.float32)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(logp, ids, -1)
    order = np.argsort(-top, -1)
    ids, top = np.take_along_axis(ids, order, -1), np.take_along_axis(top, order, -1)
    tail = np.log1p(-np.exp(top).sum(-1).clip(max=1 - 1e-7))
    z = logp / temperature
    lse_t = (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)).astype(np.float32)
    t = SoftTargets(
        ids.astype(np.int32), top.astype(np.float32), tail.astype(np.float32), lse_t, np.ones(n, np.float32)
    )
    lengths = np.tile(np.array([[prompt, length - 1]], np.int32), (b, 1))
    return Batch(inputs, pos, labels.astype(np.int32), t), tokens, lengths


def time_components(lm, cfg, b, tokens, lengths, repeats: int) -> dict[str, float]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    from kd_worker.engine.models import head_logits, hidden_at
    from kd_worker.engine.objective import Objective, to_mx_targets, uld_rows
    from kd_worker.engine.trainer import make_step

    x, pos, t = mx.array(b.inputs), mx.array(b.positions), tuple(to_mx_targets(b))
    uld = uld_rows(b)
    n_vocab = lm.n_tokens

    def grad_of(loss):
        vg = nn.value_and_grad(lm.model, loss)
        return lambda: mx.eval(vg(lm.model))

    body = grad_of(lambda m: hidden_at(lm, x, pos).sum())
    head = grad_of(lambda m: head_logits(lm, hidden_at(lm, x, pos), n_vocab).sum())
    ours, state = make_step(lm, Objective.from_config(cfg, n_vocab), optim.Adam(learning_rate=1e-4))
    opt2 = optim.Adam(learning_rate=1e-4)
    vg = nn.value_and_grad(lm.model, default_loss)
    st2 = [lm.model.state, opt2.state, mx.random.state]

    @partial(mx.compile, inputs=st2, outputs=st2)
    def sft(batch, lens):
        (loss, ntoks), grads = vg(lm.model, batch, lens)
        opt2.update(lm.model, grads)
        return loss, ntoks

    tb, tl = mx.array(tokens), mx.array(lengths)
    run_ours = lambda: mx.eval(state, ours(x, pos, t, uld))  # noqa: E731
    run_sft = lambda: mx.eval(st2, sft(tb, tl))  # noqa: E731
    out = {
        name: best_of(fn, repeats, warmup=2)
        for name, fn in (("body", body), ("body+head", head), ("ours", run_ours), ("mlx_lm_sft", run_sft))
    }
    mx.reset_peak_memory()
    run_ours()
    out["ours_peak_mb"] = mx.get_peak_memory() / 2**20
    mx.reset_peak_memory()
    run_sft()
    out["sft_peak_mb"] = mx.get_peak_memory() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[2048, 32000, 151936])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for v in args.vocab:
        lm, cfg = student(v, BODY)
        b, tokens, lengths = batch(v, args.batch, args.prompt, args.response)
        t = time_components(lm, cfg, b, tokens, lengths, args.repeats)
        rows.append(
            [
                v,
                t["body"] * 1e3,
                (t["body+head"] - t["body"]) * 1e3,
                (t["ours"] - t["body+head"]) * 1e3,
                t["ours"] * 1e3,
                t["mlx_lm_sft"] * 1e3,
                t["ours"] / t["mlx_lm_sft"],
                t["ours_peak_mb"],
                t["sft_peak_mb"],
            ]
        )
        print(f"V={v}: ours {t['ours'] * 1e3:.0f} ms, mlx-lm SFT {t['mlx_lm_sft'] * 1e3:.0f} ms", flush=True)
    report(
        "step",
        f"training step, B={args.batch} prompt={args.prompt} response={args.response}, body {BODY}",
        [
            "V",
            "body ms",
            "LM head ms",
            "loss ms",
            "ours ms",
            "mlx-lm SFT ms",
            "ours/SFT",
            "ours peak MB",
            "SFT peak MB",
        ],
        rows,
        {"target": "ours/SFT <= 1.2", "body": BODY, "k": 64, "temperature": 2.0},
    )


if __name__ == "__main__":
    main()
