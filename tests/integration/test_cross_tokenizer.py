"""Cross-tokenizer distillation end to end on the tiny fixtures: a qwen2/ChatML teacher and
students with other tokenizers (Llama-3-style byte-level BPE, sentencepiece-style)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx_lm
import pytest
from helpers import SAMPLES, distill, kd_env, venv_bin

from jobs import publisher
from jobs.errors import VocabularyMismatch

PROMPTS = SAMPLES / "task.jsonl"
SMALL = {
    "iterations": 30,
    "gen_max_tokens": 40,
    "val_every": 15,
    "save_every": 15,
    "val_fraction": 0.25,
    "learning_rate": 1e-3,
}


def test_cli_distills_a_llama_student_from_a_qwen_teacher(tmp_path, models_root):
    env = kd_env(KD_WORK_DIR=str(tmp_path / "work"))
    args = [
        venv_bin("kd-worker"),
        "distill",
        "--domain",
        "task",
        "--prompts",
        str(PROMPTS),
        "--teacher",
        str(models_root / "teacher"),
        "--student",
        str(models_root / "student-llama"),
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["published"]
    d = tmp_path / "out" / "task"
    metrics = json.loads((d / "kd_metrics.json").read_text())
    cov = metrics["xtok"]
    assert metrics["vocabulary"]["mode"] == "cross"
    assert cov["positions"] == metrics["data"]["response_tokens"]
    assert cov["positions"] == cov["one_to_one"] + cov["merged"] + cov["uld"] + cov["ce_only"]
    assert cov["share_aligned"] >= 0.5 and cov["mass_mapped"] >= 0.5 and cov["uld"] > 0
    before, after = metrics["before"], metrics["after"]
    assert after["kl"] < before["kl"]  # KL to the teacher on aligned positions falls
    assert {"uld", "aligned"} <= set(after) and 0 < after["aligned"] < 1
    assert any("uld" in row for row in metrics["train"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["kd"]["vocabulary"]["mode"] == "cross"
    model, tok = mlx_lm.load(str(models_root / "student-llama"), adapter_path=str(d))
    assert mlx_lm.generate(model, tok, "hello", max_tokens=4)


def test_sentencepiece_student_with_ce_at_unaligned_positions(tmp_path, models_root):
    out = distill(
        tmp_path, models_root, "task", student="student-sp", run_id="x1", overrides={**SMALL, "xtok_unaligned": "ce"}
    )
    assert out["published"] and out["after"]["kl"] < out["before"]["kl"]
    metrics = json.loads((Path(out["adapter_path"]) / "kd_metrics.json").read_text())
    cov = metrics["xtok"]
    assert cov["uld"] == 0 and cov["ce_only"] > 0 and cov["one_to_one"] > 0
    assert "uld" not in out["after"]  # no ULD term at all in CE mode


def test_low_coverage_is_refused_before_training(tmp_path, models_root):
    with pytest.raises(VocabularyMismatch, match="xtok_min_coverage=0.99"):
        distill(
            tmp_path,
            models_root,
            "task",
            student="student-llama",
            run_id="x1",
            overrides={**SMALL, "xtok_min_coverage": 0.99, "gen_max_tokens": 16},
        )
    assert publisher.resolve(tmp_path / "adapters_kd", "task") is None
