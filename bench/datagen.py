"""Data generation: our teacher phase (batched generate + teacher-forced scoring + top-k + tail +
cache writes) vs the bare minimum with mlx-lm: `batch_generate` for the same prompts plus one
scoring forward pass. Greedy decoding, so both produce the same tokens. Target overhead <= 10%.

    .venv/bin/python -m bench.datagen [--model fixture|qwen] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import report, sample_prompts


def prompts() -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in sample_prompts()]


def ours(lm, convs, max_tokens: int, cache_dir: Path, batch: int) -> tuple[float, int]:
    from jobs.config import resolve_config
    from kd_worker.engine.cache import TargetCache
    from kd_worker.engine.data import Example, example_key
    from kd_worker.engine.hooks import Hooks
    from kd_worker.engine.teacher import Teacher
    from kd_worker.engine.vocab import VocabPlan

    cfg = resolve_config({"gen_max_tokens": max_tokens, "gen_temperature": 0.0, "gen_batch_size": batch})
    examples = [Example(example_key(c, None), tuple(c), None, f"p{i}") for i, c in enumerate(convs)]
    plan = VocabPlan("direct", lm.n_tokens, lm.n_tokens, lm.n_tokens, lm.rows, lm.rows)
    cache = TargetCache(cache_dir)
    t = time.perf_counter()
    teacher = Teacher(lm, cache)
    p = teacher.prompts(examples, cfg.max_seq_length)
    r = teacher.responses(examples, p, cfg, Hooks())
    teacher.targets(p, r, cfg, plan.n_vocab, Hooks())
    return time.perf_counter() - t, sum(len(x) for x in r)


def bare(lm, convs, max_tokens: int, batch: int) -> tuple[float, int]:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import batch_generate

    t = time.perf_counter()
    ids = [lm.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    out = []
    for s in range(0, len(ids), batch):
        out += batch_generate(
            lm.model,
            lm.tokenizer,
            ids[s : s + batch],
            max_tokens=max_tokens,
            return_token_ids=True,
            completion_batch_size=batch,
            prefill_batch_size=batch,
        ).token_ids
    for s in range(0, len(ids), batch):  # one teacher-forced pass over prompt + response
        seqs = [p + r for p, r in zip(ids[s : s + batch], out[s : s + batch], strict=True)]
        x = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
        for i, q in enumerate(seqs):
            x[i, : len(q)] = q
        mx.eval(lm.model(mx.array(x)))
    return time.perf_counter() - t, sum(len(x) for x in out)


def load(kind: str, root: Path):
    from kd_worker.engine.models import load_model_dir

    if kind == "qwen":
        from kd_worker.fixtures.qwenvocab import build_qwen_model

        return load_model_dir(build_qwen_model(root / "qwen", hidden_size=256, num_layers=4))
    from kd_worker.fixtures.tinymodels import build_demo_models

    return load_model_dir(build_demo_models(root, ("teacher",))["teacher"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", choices=("fixture", "qwen"), default=["fixture", "qwen"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    convs = prompts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.model:
            lm = load(kind, Path(tmp) / kind)
            bare(lm, convs[:4], 8, args.batch)  # warm-up (compilation, allocations)
            b_s, b_tok = bare(lm, convs, args.max_tokens, args.batch)
            o_s, o_tok = ours(lm, convs, args.max_tokens, Path(tmp) / f"cache-{kind}", args.batch)
            rows.append([kind, lm.n_tokens, len(convs), o_tok, b_tok, o_s, b_s, (o_s / b_s - 1) * 100])
    report(
        "datagen",
        "teacher phase: ours (generate + score + top-k + cache) vs mlx-lm batch_generate + 1 forward",
        ["teacher", "V", "prompts", "tokens ours", "tokens bare", "ours s", "bare s", "overhead %"],
        rows,
        {"target": "overhead <= 10%", "max_tokens": args.max_tokens, "batch": args.batch, "decoding": "greedy"},
    )


if __name__ == "__main__":
    main()
