"""The quality benchmark's models: a teacher trained to be competent on the task, student bases
that only know the format. Built by this repo's code, deterministically, cached by recipe digest.

    quality-teacher        Qwen2 (3 layers, d=192, tied embeddings padded past its tokenizer like
                           Qwen2.5's), full-parameter SFT *from scratch* on the KD questions mixed
                           with the format questions; every step draws fresh questions and a
                           uniformly sampled correct answer, so on a set question it learns to
                           spread its probability over the set (the dark knowledge KD transfers).
                           Two recipes that failed, kept here as facts: KD questions alone, and an
                           untied output head, both plateaued (loss ~0.65-0.87 after 700-2000
                           steps) answering from priors ("min -> 0") without learning to read
                           the list; tied embeddings make copying a list item into the answer
                           nearly free, and the format questions teach that copying first.
    quality-student        Qwen2 shape of the `student` fixture (2 layers, d=128, tied, fewer padding
                           rows: the `sliced` vocabulary case), same tokenizer; pretrained on the
                           format questions only (first/last/count/copy over the same lists)
    quality-student-llama  Llama shape, the *other* tokenizer and chat template (`student-llama`),
                           the same format pretraining: the cross-tokenizer student

Why a format-pretrained student: a randomly initialised base cannot be taught anything useful by
a rank-8 LoRA in a few hundred steps, and a real student base (Qwen2.5-0.5B) already reads and
writes the format. Pretraining on *other* questions about the same lists gives the student that
reader and writer without giving away the answers the benchmark measures.

Models are ordinary HF-layout directories (`mlx_lm.load`, `kd-worker distill --teacher/--student`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from bench import quality_task as task
from kd_worker.fixtures.tinymodels import (
    LLAMA_TOKENIZER,
    QWEN_TOKENIZER,
    ModelSpec,
    build_model,
    spec_digest,
    up_to_date,
)

RECIPE_VERSION = 1

SPECS = {
    s.name: s
    for s in (
        ModelSpec(
            "quality-teacher", "qwen2", QWEN_TOKENIZER, 192, 3, 4, 2, 512, extra_rows=88, tie_embeddings=True, seed=11
        ),
        ModelSpec(
            "quality-student", "qwen2", QWEN_TOKENIZER, 128, 2, 4, 2, 256, extra_rows=24, tie_embeddings=True, seed=12
        ),
        ModelSpec(
            "quality-student-llama",
            "llama",
            LLAMA_TOKENIZER,
            128,
            2,
            4,
            2,
            256,
            extra_rows=32,
            tie_embeddings=True,
            seed=13,
        ),
    )
}


@dataclass(frozen=True)
class Recipe:
    """Full-parameter SFT on freshly drawn questions: AdamW, linear warm-up, cosine decay."""

    ops: tuple[str, ...]
    steps: int
    batch_size: int
    learning_rate: float
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    set_answers: str = "uniform"  # "uniform": a random correct answer; "first": the first in list order


RECIPES = {
    "quality-teacher": Recipe(task.KD_OPS * 2 + task.FORMAT_OPS, steps=2000, batch_size=48, learning_rate=2e-3),
    "quality-student": Recipe(
        task.FORMAT_OPS + task.KD_OPS, steps=1500, batch_size=48, learning_rate=2e-3, set_answers="first"
    ),
    "quality-student-llama": Recipe(
        task.FORMAT_OPS + task.KD_OPS, steps=1500, batch_size=48, learning_rate=2e-3, set_answers="first"
    ),
}


def recipe_digest(name: str) -> str:
    blob = json.dumps(
        {
            "v": RECIPE_VERSION,
            "task": task.TASK_VERSION,
            "spec": spec_digest(SPECS[name]),
            "recipe": asdict(RECIPES[name]),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode_batch(
    tokenizer, conversations: list[list[dict]], responses: list[str]
) -> tuple[list[list[int]], list[int]]:
    """(prompt + response + EOS ids, prompt lengths), with the model's own chat template."""
    hf = tokenizer._tokenizer
    texts = hf.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    prompts = hf(texts, add_special_tokens=False)["input_ids"]
    answers = hf(responses, add_special_tokens=False)["input_ids"]
    eos = hf.eos_token_id
    return [list(p) + list(a) + [eos] for p, a in zip(prompts, answers, strict=True)], [len(p) for p in prompts]


Draw = Callable[[random.Random], tuple[list[list[dict]], list[str]]]  # rng -> (conversations, responses)


def draw_questions(recipe: Recipe) -> Draw:
    """A batch of the recipe's freshly drawn task questions with their answers."""

    def draw(rng: random.Random) -> tuple[list[list[dict]], list[str]]:
        batch = [task.make_item(rng, rng.choice(recipe.ops)) for _ in range(recipe.batch_size)]
        pick = task.first_answer if recipe.set_answers == "first" else partial(task.sample_answer, rng=rng)
        return [it.messages for it in batch], [pick(it) for it in batch]

    return draw


def sft(model, tokenizer, recipe: Recipe, say: Callable[[str], None], draw: Draw | None = None) -> dict[str, float]:
    """Train every parameter of `model` on batches from `draw` (default: the recipe's questions), CE
    on response tokens, EOS included."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    rng = random.Random(f"sft:{recipe.seed}")
    mx.random.seed(recipe.seed)
    sched = optim.join_schedules(
        [
            optim.linear_schedule(1e-7, recipe.learning_rate, recipe.warmup),
            optim.cosine_decay(recipe.learning_rate, recipe.steps - recipe.warmup, recipe.learning_rate / 20),
        ],
        [recipe.warmup],
    )
    opt = optim.AdamW(learning_rate=sched, weight_decay=recipe.weight_decay)
    model.train()

    def loss_fn(model, x, y, mask):
        logits = model(x).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, y, reduction="none")
        return (ce * mask).sum() / mask.sum()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, mask):
        loss, grads = value_and_grad(model, x, y, mask)
        opt.update(model, grads)
        return loss

    t0, losses = time.perf_counter(), []
    draw = draw or draw_questions(recipe)
    for s in range(recipe.steps):
        seqs, starts = _encode_batch(tokenizer, *draw(rng))
        width = -(-max(map(len, seqs)) // 8) * 8  # few distinct shapes: few recompilations
        x = np.zeros((len(seqs), width), np.int32)
        y = np.zeros_like(x)
        mask = np.zeros(x.shape, np.float32)
        for b, (ids, p) in enumerate(zip(seqs, starts, strict=True)):
            x[b, : len(ids) - 1], y[b, : len(ids) - 1] = ids[:-1], ids[1:]
            mask[b, p - 1 : len(ids) - 1] = 1.0
        loss = step(mx.array(x), mx.array(y), mx.array(mask))
        mx.eval(state, loss)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"SFT diverged at step {s + 1}: loss {losses[-1]}")
        if (s + 1) % 100 == 0 or s + 1 == recipe.steps:
            say(
                f"    sft step {s + 1}/{recipe.steps} loss {np.mean(losses[-100:]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    return {"final_loss": float(np.mean(losses[-100:])), "seconds": time.perf_counter() - t0}


def build(name: str, root: Path, say: Callable[[str], None] = print) -> Path:
    """The trained model directory `root/name`, built (staged, then renamed) unless already current."""
    return build_trained(SPECS[name], RECIPES[name], recipe_digest(name), root, say)


def build_trained(
    spec: ModelSpec, recipe: Recipe, digest: str, root: Path, say: Callable[[str], None], draw: Draw | None = None
) -> Path:
    """`root/spec.name`: a random-init model of `spec` after full-parameter SFT by `recipe` (batches from
    `draw`, default the recipe's questions), cached under `digest`."""
    name = spec.name
    out = root / name
    if up_to_date(out, digest):
        return out
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import save_model

    say(f"  training {name} (recipe {digest}; cached under {out})")
    stage = build_model(spec, root / f"{name}.init")  # random init, HF layout, tokenizer files
    model, tokenizer = mlx_lm.load(str(stage))
    model.set_dtype(mx.float32)
    stats = sft(model, tokenizer, recipe, say, draw)
    save_model(stage, model)
    (stage / "kd_fixture.json").write_text(
        json.dumps({"name": name, "digest": digest, "recipe": asdict(recipe), "sft": stats}, indent=2) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return out
