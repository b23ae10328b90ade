"""Readable held-out samples in kd_metrics.json (engine.samples): the first held-out prompts, the
teacher's response, and the student's greedy answers before and after training, checked against
mlx-lm's own generation of the base and of the published adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import FAST, distill
from mlx_lm.sample_utils import make_sampler

from jobs import publisher
from jobs.config import resolve_config
from kd_worker.engine.data import load_examples, split_examples
from kd_worker.engine.samples import prompt_text

CORRECTIONS = [
    {"prompt": f"Remember fact number {i}: the box is {c}. What colour is the box?", "response": f"The box is {c}."}
    for i, c in enumerate(["red", "blue", "green", "yellow", "black", "white", "orange", "purple"] * 2)
]
OVER = {**FAST, "iterations": 20, "val_fraction": 0.4, "samples": 3, "gen_max_tokens": 12, "learning_rate": 1e-2}


def greedy_text(model_dir: Path, adapter: Path | None, messages: list[dict], max_tokens: int) -> str:
    """mlx-lm's own single-prompt generation: independent of the engine's batched generator."""
    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(adapter) if adapter else None)[:2]
    model.set_dtype(mx.float32)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(model, tok, prompt=prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)).strip()


@pytest.fixture
def corrections(tmp_path) -> Path:
    path = tmp_path / "fixes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CORRECTIONS))
    return path


def test_samples_hold_the_first_held_out_prompts_with_teacher_before_and_after(tmp_path, models_root, corrections):
    out = distill(tmp_path, models_root, data=(("corrections", corrections),), overrides=OVER)
    metrics = json.loads((Path(out["adapter_path"]) / publisher.METRICS).read_text())
    samples = metrics["samples"]
    cfg = resolve_config(FAST, OVER)
    _, held_out = split_examples(load_examples((("corrections", corrections),), 1000), cfg.val_fraction, cfg.seed)
    chosen = held_out[:3]
    assert [s["prompt"] for s in samples] == [prompt_text(e) for e in chosen]
    assert [s["teacher"] for s in samples] == [e.response for e in chosen]  # given responses are the teacher's
    student = models_root / "student"
    for s, ex in zip(samples, chosen, strict=True):
        messages = list(ex.prompt)
        assert s["before"] == greedy_text(student, None, messages, cfg.gen_max_tokens)
        assert s["after"] == greedy_text(student, Path(out["adapter_path"]), messages, cfg.gen_max_tokens)
    assert [s["before"] for s in samples] != [s["after"] for s in samples]  # lr 1e-2: training changed the answers


def test_samples_can_be_turned_off_and_need_held_out_data(tmp_path, models_root, corrections):
    off = distill(tmp_path / "a", models_root, data=(("corrections", corrections),), overrides={**OVER, "samples": 0})
    assert json.loads((Path(off["adapter_path"]) / publisher.METRICS).read_text())["samples"] == []
    none = distill(
        tmp_path / "b", models_root, data=(("corrections", corrections),), overrides={**OVER, "val_fraction": 0.0}
    )
    assert json.loads((Path(none["adapter_path"]) / publisher.METRICS).read_text())["samples"] == []
