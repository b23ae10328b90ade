"""Sparse soft targets: bytes per stored token at k = 16/64/256 vs full-vocabulary storage for
V = 151,936 (the real Qwen2.5 vocabulary), and the loss step's peak memory with sparse targets vs
a dense [N, V] teacher tensor. Target: <= 1 KB per token at k = 64.

    .venv/bin/python -m bench.targets [--positions 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import report, sample_prompts


def storage_rows(root: Path) -> tuple[list[list], dict]:
    """Score the bundled prompts with a Qwen-vocabulary teacher and store targets at several k."""
    from kd_worker.engine.cache import TargetCache, cache_key
    from kd_worker.engine.models import load_model_dir
    from kd_worker.engine.teacher import score
    from kd_worker.fixtures.qwenvocab import build_qwen_model

    lm = load_model_dir(build_qwen_model(root / "qwen"))
    pairs = []
    for text in sample_prompts()[:24]:
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Answer briefly."}], add_generation_prompt=True
        )
        pairs.append((prompt, lm.hf_tokenizer.encode(text, add_special_tokens=False) + [lm.hf_tokenizer.eos_token_id]))
    tokens = sum(len(r) for _, r in pairs)
    v = lm.n_tokens
    rows = []
    for k in (16, 64, 256):
        cache = TargetCache(root / f"cache-{k}")
        targets = score(lm, pairs, v, k, 2.0)
        for (p, r), t in zip(pairs, targets, strict=True):
            cache.put_targets(cache_key(p=p, r=r, k=k), t)
        disk = sum(f.stat().st_size for f in (root / f"cache-{k}").rglob("*.safetensors"))
        mem = sum(t.nbytes for t in targets) / tokens
        rows.append([f"sparse k={k}", v, mem, disk / tokens, (v * 4) / mem])
    rows.append(["full vocabulary, float32", v, v * 4.0, "", 1.0])
    rows.append(["full vocabulary, bfloat16", v, v * 2.0, "", 2.0])
    return rows, {"tokens": tokens, "examples": len(pairs), "n_tokens": v}


def loss_memory(positions: int, vocab: int = 151_936, k: int = 64) -> list[list]:
    """Peak MLX memory of loss + gradient w.r.t. the student's logits: sparse vs dense teacher."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from bench.step import BODY, batch, student
    from kd_worker.engine import losses as L
    from kd_worker.engine.models import hidden_at
    from kd_worker.engine.objective import Objective, to_mx_targets

    body = {**BODY, "num_hidden_layers": 1}
    lm, cfg = student(vocab, body)
    b, _, _ = batch(vocab, 4, 16, positions // 4, k=k)
    x, pos, t = mx.array(b.inputs), mx.array(b.positions), to_mx_targets(b)
    obj = Objective.from_config(cfg, vocab)
    teacher_logits = mx.array(np.random.default_rng(0).normal(0, 3, (positions, vocab)).astype(np.float32))
    mx.eval(teacher_logits)

    def dense(model):  # what a dense distiller does: the teacher's full rows in the step
        z = lm.split[1](hidden_at(lm, x, pos))[:, :vocab]
        zt, tt = z / cfg.temperature, teacher_logits / cfg.temperature
        lq = zt - mx.logsumexp(zt, axis=-1, keepdims=True)
        lp = tt - mx.logsumexp(tt, axis=-1, keepdims=True)
        kl = (mx.exp(lp) * (lp - lq)).sum() / positions
        ce = (mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, t.labels[:, None], axis=-1).squeeze(-1)).mean()
        return cfg.alpha * cfg.temperature**2 * kl + (1 - cfg.alpha) * ce

    def autodiff(model):
        return L.combine(obj.sums(lm, hidden_at(lm, x, pos), t), cfg.temperature, cfg.alpha)

    def fused(model):
        return obj.loss(lm, hidden_at(lm, x, pos), t)[0]

    rows = []
    for name, fn, teacher_elems in (
        ("dense teacher [N, V] (reference)", dense, positions * vocab),
        ("sparse, autodiff + checkpointed chunks", autodiff, positions * k),
        ("sparse, fused (training default)", fused, positions * k),
    ):
        vg = nn.value_and_grad(lm.model, fn)
        mx.eval(vg(lm.model))
        mx.reset_peak_memory()
        mx.eval(vg(lm.model))
        rows.append([name, positions, vocab, teacher_elems, mx.get_peak_memory() / 2**20])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, extra = storage_rows(Path(tmp))
    report(
        "targets_storage",
        f"stored teacher targets per response token (V={extra['n_tokens']:,})",
        ["storage", "V", "bytes/token (arrays)", "bytes/token (on disk)", "x smaller than fp32 rows"],
        rows,
        {**extra, "target": "<= 1024 bytes/token at k=64"},
    )
    mem = loss_memory(args.positions)
    report(
        "targets_memory",
        "loss step (loss + gradient) peak memory, student logits on response positions",
        ["teacher targets", "positions N", "V", "teacher elements in the step", "peak MiB"],
        mem,
        {"note": "the sparse paths never hold a [N, V] teacher tensor: teacher arrays are [N, k] and [N]"},
    )


if __name__ == "__main__":
    main()
