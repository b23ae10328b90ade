"""The tiny demo models: deterministic, real HF layout, loadable and runnable by mlx-lm."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx_lm
import pytest

from kd_worker.fixtures import tinymodels as tm


def test_tokenizer_training_is_deterministic():
    a = tm.train_tokenizer(tm.QWEN_TOKENIZER, tm.corpus_text())
    b = tm.train_tokenizer(tm.QWEN_TOKENIZER, tm.corpus_text())
    assert a.to_str() == b.to_str()


def test_model_build_is_deterministic(tmp_path, models_root):
    again = tm.build_model(tm.SPECS["student"], tmp_path / "student")
    assert (again / "model.safetensors").read_bytes() == (models_root / "student" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", tm.ALL_NAMES)
def test_every_fixture_loads_and_generates_with_mlx_lm(models_root, name):
    model, tok = mlx_lm.load(str(models_root / name))
    ids = tok.apply_chat_template([{"role": "user", "content": "Remember this?"}], add_generation_prompt=True)
    out = mlx_lm.generate(model, tok, ids, max_tokens=5)
    assert isinstance(out, str) and len(tok.encode(out, add_special_tokens=False)) >= 1
    cfg = json.loads((models_root / name / "config.json").read_text())
    assert cfg["vocab_size"] >= len(tok._tokenizer)
    assert ("quantization" in cfg) == name.endswith("bit")


def test_fixture_pairs_mirror_the_real_cases(models_root):
    t = json.loads((models_root / "teacher" / "config.json").read_text())
    s = json.loads((models_root / "student" / "config.json").read_text())
    llama = json.loads((models_root / "student-llama" / "config.json").read_text())
    _, ttok = mlx_lm.load(str(models_root / "teacher"))
    _, ltok = mlx_lm.load(str(models_root / "student-llama"))
    n = len(ttok._tokenizer)
    assert t["vocab_size"] > s["vocab_size"] > n  # 7B-style and 3B-style padding over one tokenizer
    assert not t["tie_word_embeddings"] and s["tie_word_embeddings"]
    assert len(ltok._tokenizer) != n and llama["model_type"] == "llama"
    assert ltok.encode("hi")[0] == ltok._tokenizer.bos_token_id  # adds a BOS; the teacher's does not
    assert ttok.encode("hi")[0] != ttok._tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_mlx_lm_generate_cli_produces_tokens(models_root):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(models_root / "teacher"),
            "--prompt",
            "hello",
            "--max-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "Generation: 5 tokens" in out.stdout


def test_make_demo_models_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kd_worker.cli", "make-demo-models", str(tmp_path), "--only", "student"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and (tmp_path / "student" / "config.json").is_file()
