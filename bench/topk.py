"""How far the sparse top-k + tail KD loss and its gradient fall from the full-vocabulary ones,
on teacher-like (peaked) distributions from a trained model rather than random logits.

    .venv/bin/python -m bench.topk                    # a small pair trained here on the quality task (~1 min)
    .venv/bin/python -m bench.topk --models quality   # bench.quality's teacher and student (cached by it;
                                                      # ~25 min to build cold on an idle 2-core machine)

Per response position of held-out questions (teacher-forced on a correct answer), the teacher's
targets at k = 8 / 16 / 64 and k = V go through the engine's own path (teacher.targets_from_logits,
then losses.forward_kl_ce_grad, the fused training loss and its closed-form gradient) and are
compared with the dense KL(p_T || q_T) and its gradient (q_T - p_T) / T in float64 numpy.
The coarsened loss is a lower bound of the full one (equal at k = V), so its gap shrinks as k grows;
the gradient's error usually does too, but need not (outside the support the target spreads the
teacher's tail mass like the student's). The exact float64 coarsened loss is computed as well, which
separates the approximation from float32 effects in the engine. Results: bench/results/topk.json.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import report  # first: a fast BLAS before mlx loads
from kd_worker.fixtures.tinymodels import QWEN_TOKENIZER, ModelSpec, build_model, spec_digest, up_to_date

KS = (8, 16, 64)
TEMPERATURES = (1.0, 2.0)
TINY_STEPS, TINY_BATCH, TINY_LR = 150, 16, 1e-2  # the tiny teacher's SFT; its student stops at a fifth


def log_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z.astype(np.float64) / temperature
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def dense_reference(t_logits: np.ndarray, s_logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(p_T || q_T) [N] and its gradient w.r.t. the student's logits [N, V], float64."""
    lp, lq = log_softmax(t_logits, temperature), log_softmax(s_logits, temperature)
    p = np.exp(lp)
    return (p * (lp - lq)).sum(-1), (np.exp(lq) - p) / temperature


def coarse_reference(
    t_logits: np.ndarray, s_logits: np.ndarray, ids: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """What the sparse loss computes, exactly: the KL of the distributions coarsened to the support
    `ids` plus one tail bucket, and its gradient, float64 (masses summed, never 1 - support)."""
    p, q = np.exp(log_softmax(t_logits, temperature)), np.exp(log_softmax(s_logits, temperature))
    outside = np.ones(p.shape, bool)
    np.put_along_axis(outside, ids, False, -1)
    p_s, q_s = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
    p_t, q_t = (p * outside).sum(-1), (q * outside).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_t > 0, p_t * np.log(p_t / q_t), 0.0)
        target = np.where(outside, q * np.where(q_t > 0, p_t / q_t, 0.0)[:, None], p)
    return (p_s * np.log(p_s / q_s)).sum(-1) + tail, (q - target) / temperature


def measure(
    t_logits: np.ndarray, s_logits: np.ndarray, ks: Sequence[int], temperature: float
) -> list[dict[str, float]]:
    """One row per k (k >= V: the full support): the teacher's top-k mass at T=1; the full and the
    top-k mean KL; the loss gap (full - engine) / full and the exact gap (full - float64 coarsened)
    / full; the gradient's relative error and cosine to the full one; and how far the engine's
    float32 loss and gradient are from the exact coarsened ones (fp32_loss_excess, fp32_grad_err)."""
    import mlx.core as mx

    from kd_worker.engine.losses import Targets, forward_kl_ce_grad
    from kd_worker.engine.teacher import targets_from_logits

    n, v = t_logits.shape
    kl_full, g_full = dense_reference(t_logits, s_logits, temperature)

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    rows = []
    for k in ks:
        ids, logp, tail, lse_t = targets_from_logits(t_logits.copy(), k, temperature)
        t = Targets(*(mx.array(a) for a in (ids, logp, tail, lse_t, ids[:, 0])), mx.ones((n,)))
        kl, _, grad = forward_kl_ce_grad(mx.array(s_logits), t, temperature, mx.array(1.0), mx.array(0.0))
        kl_k, g_k = np.array(kl, np.float64), np.array(grad, np.float64)
        kl_c, g_c = coarse_reference(t_logits, s_logits, ids, temperature)
        rows.append(
            {
                "k": min(k, v),
                "T": temperature,
                "teacher_mass": float(np.exp(np.logaddexp.reduce(logp.astype(np.float64), axis=-1)).mean()),
                "kl_full": float(kl_full.mean()),
                "kl_topk": float(kl_k.mean()),
                "loss_gap": float((kl_full.sum() - kl_k.sum()) / kl_full.sum()),
                "exact_gap": float((kl_full.sum() - kl_c.sum()) / kl_full.sum()),  # the approximation alone
                "grad_rel_err": rel(g_k, g_full),
                "grad_cos": float((g_k * g_full).sum() / (np.linalg.norm(g_k) * np.linalg.norm(g_full))),
                "fp32_loss_excess": float((kl_k.sum() - kl_c.sum()) / kl_full.sum()),
                "fp32_grad_err": rel(g_k, g_c),
            }
        )
    return rows


def response_logits(teacher_dir: Path, student_dir: Path, n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and student logits [N, V] (V: the shared real vocabulary) at every response position
    of `n_items` held-out task questions, teacher-forced on a correct answer (EOS included)."""
    import mlx.core as mx

    from kd_worker.engine.models import head_logits, hidden_at, load_model_dir
    from kd_worker.engine.vocab import plan_vocabulary
    from kd_worker.fixtures import digits as task

    teacher, student = load_model_dir(teacher_dir), load_model_dir(student_dir)
    n_vocab = plan_vocabulary(teacher, student, allow_cross=False).n_vocab
    rng = random.Random(f"topk:{seed}")
    seqs = []
    for item in task.items(n_items, seed=10_000 + seed):
        prompt = list(teacher.tokenizer.apply_chat_template(item.messages, add_generation_prompt=True))
        answer = teacher.hf_tokenizer.encode(task.sample_answer(item, rng), add_special_tokens=False)
        seqs.append((prompt, list(answer) + [teacher.eos_id]))
    width = max(len(p) + len(r) for p, r in seqs) - 1
    inputs = np.zeros((len(seqs), width), np.int32)
    positions = []
    for b, (p, r) in enumerate(seqs):
        inputs[b, : len(p) + len(r) - 1] = (p + r)[:-1]
        positions.append(b * width + len(p) - 1 + np.arange(len(r)))  # the logit at i predicts token i + 1
    x, pos = mx.array(inputs), mx.array(np.concatenate(positions).astype(np.int32))
    t, s = (np.array(head_logits(lm, hidden_at(lm, x, pos), n_vocab), np.float32) for lm in (teacher, student))
    return t, s


TINY = ModelSpec("topk-tiny", "qwen2", QWEN_TOKENIZER, 48, 1, 2, 1, 128, extra_rows=24, tie_embeddings=True, seed=5)


def tiny_pair(
    root: Path, say: Callable[[str], None] = print, steps: int = TINY_STEPS, tokenizer_dir: Path | None = None
) -> tuple[Path, Path]:
    """A one-layer Qwen2 over the demo tokenizer trained on the quality task (seconds, not minutes):
    the student is its snapshot after a fifth of the steps (it knows the format, not the answers),
    the teacher the end of the run. Built once per recipe under `root`; `tokenizer_dir` (a demo
    model with the chatml-1000 tokenizer) saves training the tokenizer again."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm

    from kd_worker.fixtures import digits as task

    digest = f"{spec_digest(TINY)}-{task.TASK_VERSION}-{steps}-{TINY_BATCH}-{TINY_LR}"
    teacher, student = root / "topk-teacher", root / "topk-student"
    if up_to_date(teacher, digest) and up_to_date(student, digest):
        return teacher, student
    init = (
        build_model(TINY, root / "topk-init")
        if tokenizer_dir is None
        else _init_with(tokenizer_dir, root / "topk-init")
    )
    model, tokenizer = mlx_lm.load(str(init))
    model.set_dtype(mx.float32)
    opt, rng = optim.Adam(learning_rate=TINY_LR), random.Random("topk")
    for out, n in ((student, max(steps // 5, 1)), (teacher, steps - max(steps // 5, 1))):
        loss = sft(model, tokenizer, opt, rng, n)
        say(f"  {out.name}: {n} more SFT steps, loss {loss:.3f}")
        _save(init, model, out, {"name": out.name, "digest": digest, "loss": loss})
    return teacher, student


def _init_with(tokenizer_dir: Path, out: Path) -> Path:
    """The TINY model, randomly initialised, over an existing demo tokenizer."""
    from tokenizers import Tokenizer

    from kd_worker.fixtures.tinymodels import copy_tokenizer, model_config, random_model, save_model_dir

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = model_config(TINY, tok.get_vocab_size(), tok.token_to_id(TINY.tokenizer.eos), None)
    return save_model_dir(out, random_model(cfg, TINY.seed), cfg, lambda stage: copy_tokenizer(tokenizer_dir, stage))


def sft(model, tokenizer, opt, rng: random.Random, steps: int) -> float:
    """Cross-entropy on the response tokens (EOS included) of freshly drawn task questions with a
    uniformly drawn correct answer, so the teacher spreads over answer sets like the quality one."""
    import mlx.core as mx
    import mlx.nn as nn

    from kd_worker.fixtures import digits as task
    from kd_worker.fixtures.trained import encode_batch

    def loss_fn(model, x, y, mask):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="none")
        return (ce * mask).sum() / mask.sum()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    loss = mx.array(float("nan"))
    for _ in range(steps):
        batch = [task.make_item(rng, rng.choice(task.KD_OPS)) for _ in range(TINY_BATCH)]
        answers = [task.sample_answer(it, rng) for it in batch]
        seqs, starts = encode_batch(tokenizer, [list(it.messages) for it in batch], answers)
        width = -(-max(map(len, seqs)) // 8) * 8
        x, y, mask = (
            np.zeros((len(seqs), width), np.int32),
            np.zeros((len(seqs), width), np.int32),
            np.zeros((len(seqs), width), np.float32),
        )
        for b, (ids, p) in enumerate(zip(seqs, starts, strict=True)):
            x[b, : len(ids) - 1], y[b, : len(ids) - 1] = ids[:-1], ids[1:]
            mask[b, p - 1 : len(ids) - 1] = 1.0
        loss, grads = value_and_grad(model, mx.array(x), mx.array(y), mx.array(mask))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
    return float(loss.item())


def _save(init: Path, model, out: Path, info: dict[str, Any]) -> None:
    """The init directory's config and tokenizer with the trained weights, staged then renamed."""
    import json
    import shutil

    from mlx_lm.utils import save_model

    stage = out.with_name(out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(init, stage)
    save_model(stage, model)
    (stage / "kd_fixture.json").write_text(json.dumps(info))
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", choices=("tiny", "quality"), default="tiny")
    p.add_argument("--work", default=".kd", help="where the trained models are built and cached")
    p.add_argument("--items", type=int, default=256, help="held-out questions (2-4 response positions each)")
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.models == "quality":
        from bench import quality_models as qm

        teacher = qm.build("quality-teacher", work / "quality" / "models")
        student = qm.build("quality-student", work / "quality" / "models")
    else:
        teacher, student = tiny_pair(work / "topk")
    t_logits, s_logits = response_logits(teacher, student, args.items, seed=0)
    n, v = t_logits.shape
    rows: list[dict[str, Any]] = [r for t in TEMPERATURES for r in measure(t_logits, s_logits, (*KS, v), t)]
    table = [
        [
            r["T"],
            r["k"],
            f"{r['teacher_mass']:.4f}",
            f"{r['kl_full']:.3f}",
            f"{r['kl_topk']:.3f}",
            f"{100 * r['loss_gap']:.2f}%",
            f"{100 * r['exact_gap']:.2f}%",
            f"{r['grad_rel_err']:.4f}",
            f"{100 * r['fp32_loss_excess']:+.2f}%",
        ]
        for r in rows
    ]
    report(
        "topk",
        f"top-k + tail vs full vocabulary ({args.models} pair, {n} response positions, V={v})",
        ["T", "k", "top-k mass", "KL full", "KL top-k", "gap", "exact gap", "grad err", "fp32 excess"],
        table,
        {"models": args.models, "positions": n, "vocabulary": v, "measurements": rows},
    )


if __name__ == "__main__":
    main()
