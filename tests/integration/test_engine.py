"""The KD engine end to end on the tiny fixtures (no Redis): layout, mlx-lm compatibility,
learning, exact resume, vocabulary guard, quantized models, divergence, caching."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import FAST, SAMPLES, distill, engine_settings, kd_env, venv_bin
from structlog.testing import capture_logs

from jobs.errors import JobInterrupted, TrainingDiverged, VocabularyMismatch
from kd_worker.engine import teacher as teacher_fns
from kd_worker.engine.models import load_model_dir
from kd_worker.engine.vocab import plan_vocabulary

PROMPTS = SAMPLES / "memory.jsonl"


def test_cli_distill_writes_the_seed_layout_usable_by_mlx_lm(tmp_path, models_root):
    env = kd_env(
        KD_WORK_DIR=str(tmp_path / "work"),
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
    )
    out = subprocess.run(
        [
            venv_bin("kd-worker"),
            "distill",
            "--domain",
            "memory",
            "--prompts",
            str(PROMPTS),
            "--set",
            "iterations=40",
            "--set",
            "save_every=20",
            "--set",
            "val_every=20",
            "--set",
            "gen_max_tokens=32",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    outcome = json.loads(out.stdout)  # stdout is the outcome alone
    log = [json.loads(line) for line in out.stderr.splitlines()]  # --json: the log is JSON lines too
    timed = {e["phase"]: e for e in log if e["event"] == "phase_finished"}
    assert {"generate", "score", "train", "validate", "publish"} <= set(timed)
    assert all(e["seconds"] >= 0 and e["mlx_peak_bytes"] > 0 for e in timed.values())
    assert any(e["event"] == "progress" and e["phase"] == "train" for e in log)
    assert next(e for e in log if e["event"] == "memory_plan")["total"] > 0
    d = tmp_path / "out" / "memory"
    for name in ("adapters.safetensors", "adapter_config.json", "kd_metrics.json", "checkpoint_20", "checkpoint_40"):
        assert (d / name).exists(), name
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert set(cfg["lora_parameters"]) >= {"rank", "scale", "dropout"}
    assert cfg["kd"]["config"]["temperature"] == 2.0 and cfg["kd"]["teacher"]["identity"]
    metrics = json.loads((d / "kd_metrics.json").read_text())
    assert [r["step"] for r in metrics["val"]] == [0, 20, 40] and len(metrics["train"]) == 40
    assert {"kd", "ce", "total", "kl", "top1"} <= set(metrics["val"][0])
    assert metrics["after"]["kl"] < metrics["before"]["kl"]  # the student moved toward the teacher
    assert outcome["after"]["kl"] == metrics["after"]["kl"]
    summary = json.loads((tmp_path / "out" / "kd_summary.json").read_text())
    assert summary["domains"]["memory"]["version"] == 1
    model, tok = mlx_lm.load(str(models_root / "student"), adapter_path=str(d))
    assert mlx_lm.generate(model, tok, "hello", max_tokens=4)
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(models_root / "student"),
            "--adapter-path",
            str(d),
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0 and "Generation: 4 tokens" in gen.stdout
    fused = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(models_root / "student"),
            "--adapter-path",
            str(d),
            "--save-path",
            str(tmp_path / "fused"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fused.returncode == 0 and (tmp_path / "fused" / "model.safetensors").is_file()
    a, _ = mlx_lm.load(str(tmp_path / "fused"))
    x = mx.array([[1, 5, 9, 33]])
    assert mx.allclose(a(x), model(x), atol=1e-4).item()


def adapter(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


RESUME = {**FAST, "iterations": 30, "save_every": 5, "lora_dropout": 0.1, "val_every": 15}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models_root) -> tuple[dict[str, np.ndarray], dict]:
    """Adapter weights and kd_metrics.json of a run of RESUME never stopped."""
    out = distill(tmp_path_factory.mktemp("uninterrupted"), models_root, overrides=RESUME, run_id="full")
    return adapter(Path(out["adapter_path"])), json.loads((Path(out["adapter_path"]) / "kd_metrics.json").read_text())


def stopped_at(tmp: Path, models_root: Path, step: int) -> None:
    """A run of RESUME stopped for a warm shutdown after `step` steps (checkpointed there)."""
    steps = {"n": 0}

    def progress(p):
        steps["n"] = p.step if p.phase == "train" else steps["n"]

    with pytest.raises(JobInterrupted):
        distill(
            tmp,
            models_root,
            overrides=RESUME,
            run_id="half",
            progress=progress,
            should_stop=lambda: "shutdown" if steps["n"] >= step else None,
        )
    assert steps["n"] == step


def assert_same_run(out: dict, reference: tuple[dict[str, np.ndarray], dict], resumed_from: int) -> None:
    """Bit for bit: every adapter tensor and every logged loss of the reference run."""
    want, want_metrics = reference
    got = adapter(Path(out["adapter_path"]))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want), [k for k in want if not np.array_equal(got[k], want[k])]
    m = json.loads((Path(out["adapter_path"]) / "kd_metrics.json").read_text())
    assert m["timing"]["resumed_from"] == resumed_from and [r["step"] for r in m["val"]] == [0, 15, 30]
    assert m["train"] == want_metrics["train"] and m["val"] == want_metrics["val"]


def test_resume_at_half_equals_an_uninterrupted_run(tmp_path, models_root, uninterrupted):
    stopped_at(tmp_path, models_root, 15)
    resumed = distill(tmp_path, models_root, overrides=RESUME, run_id="half")
    assert_same_run(resumed, uninterrupted, resumed_from=15)


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, models_root, uninterrupted):
    stopped_at(tmp_path, models_root, 15)
    checkpoints = tmp_path / "work" / "runs" / "half" / "checkpoints"
    latest = checkpoints / "step_0000015" / "state.safetensors"
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the Adam state: still a loadable file, silently wrong
    latest.write_bytes(bytes(data))
    (checkpoints / ".step_0000020.999999.tmp").mkdir()  # a save killed before its rename
    with capture_logs() as logs:
        resumed = distill(tmp_path, models_root, overrides=RESUME, run_id="half")
    (warning,) = [e for e in logs if e["event"] == "checkpoint_unusable"]
    assert warning["step"] == 15 and "sha256" in warning["reason"]
    assert_same_run(resumed, uninterrupted, resumed_from=10)  # nothing trained on the damaged state


def test_vocabulary_guard_cases(models_root):
    teacher = load_model_dir(models_root / "teacher")
    same = load_model_dir(models_root / "teacher-8bit")
    student = load_model_dir(models_root / "student")
    other = load_model_dir(models_root / "student-llama")
    assert plan_vocabulary(teacher, same, allow_cross=False).mode == "direct"
    plan = plan_vocabulary(teacher, student, allow_cross=False)
    assert plan.mode == "sliced" and plan.n_vocab == teacher.n_tokens < student.rows < teacher.rows
    with pytest.raises(VocabularyMismatch) as e:
        plan_vocabulary(teacher, other, allow_cross=False)
    msg = str(e.value)
    assert "1,000 tokens" in msg and "800 tokens" in msg and "teacher" in msg and "student-llama" in msg


def test_quantized_teacher_and_qlora_student(tmp_path, models_root):
    out = distill(tmp_path, models_root, teacher="teacher-4bit", student="student-4bit", overrides=FAST)
    assert out["published"] and out["after"]["kl"] < out["before"]["kl"]
    model, tok = mlx_lm.load(str(models_root / "student-4bit"), adapter_path=out["adapter_path"])
    assert mlx_lm.generate(model, tok, "hello", max_tokens=3)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, models_root, monkeypatch):
    from kd_worker.engine import distill as D

    real = D.student_sequences

    def poisoned(*a, **k):  # one training example carries NaN teacher targets
        seqs = real(*a, **k)
        seqs[0].targets.logp[:] = np.nan
        return seqs

    monkeypatch.setattr(D, "student_sequences", poisoned)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step \d+.*last good checkpoint is step \d+"):
        distill(tmp_path, models_root, overrides={**FAST, "iterations": 30, "save_every": 1, "batch_size": 1})
    runs = list((tmp_path / "work" / "runs").iterdir())
    assert runs and any((runs[0] / "checkpoints").iterdir())
    assert not (tmp_path / "adapters_kd" / "memory").exists()  # nothing published


@pytest.mark.parametrize("split", [True, False])
def test_teacher_scores_match_a_full_vocabulary_reference(models_root, monkeypatch, split):
    """Scored in chunks of 3 rows; without a body/head split the full forward runs per sequence."""
    lm = load_model_dir(models_root / "teacher")
    if not split:
        lm = dataclasses.replace(lm, split=None)
    monkeypatch.setattr(teacher_fns, "SCORE_CHUNK", 3)
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What matters?"}], add_generation_prompt=True
    )
    response = [5, 77, 301, 2]
    (t,) = teacher_fns.score(lm, [(prompt, response)], lm.n_tokens, 8, 2.0)
    logits = np.array(lm.model(mx.array([prompt + response[:-1]]))[0, len(prompt) - 1 :, : lm.n_tokens], np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ref_ids = np.argsort(-logp, -1)[:, :8]
    np.testing.assert_array_equal(t.ids, ref_ids)
    np.testing.assert_allclose(t.logp, np.take_along_axis(logp, ref_ids, -1), atol=1e-4)
    rest = np.ones_like(logp, bool)
    np.put_along_axis(rest, ref_ids, False, -1)
    np.testing.assert_allclose(t.tail, np.log(np.where(rest, np.exp(logp), 0).sum(-1)), atol=1e-4)
    z = logp / 2.0
    np.testing.assert_allclose(t.lse_t, np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1), atol=1e-4)
    assert t.ids.max() < lm.n_tokens  # padding rows of the embedding never appear


def test_generation_keeps_the_stop_token_and_never_samples_padding(models_root):
    lm = load_model_dir(models_root / "teacher")
    eos = lm.hf_tokenizer.eos_token_id
    base = teacher_fns.make_sampler(0.8, 10, 0.9, lm.n_tokens)
    calls = {"n": 0}

    def sampler(logprobs):
        calls["n"] += 1
        tok = base(logprobs)
        assert int(tok.max()) < lm.n_tokens
        return mx.full(tok.shape, eos, mx.uint32) if calls["n"] >= 3 else tok

    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    (out,) = teacher_fns.generate(lm, [prompt], [16], sampler, 1)
    assert out[-1] == eos and len(out) < 16  # the student sees the EOS and learns to stop


def test_teacher_work_is_cached_across_runs(tmp_path, models_root):
    s = engine_settings(tmp_path)
    phases: list[str] = []
    distill(tmp_path, models_root, overrides=FAST, settings=s, run_id="one", progress=lambda p: phases.append(p.phase))
    assert "generate" in phases and "score" in phases
    phases.clear()
    distill(tmp_path, models_root, overrides=FAST, settings=s, run_id="two", progress=lambda p: phases.append(p.phase))
    assert "generate" not in phases and "score" not in phases
    files = list((tmp_path / "work" / "cache" / "targets").rglob("*.safetensors"))
    assert len(files) == 12
    files[0].write_bytes(b"corrupt")  # a damaged entry is a miss, rescored
    phases.clear()
    distill(
        tmp_path, models_root, overrides=FAST, settings=s, run_id="three", progress=lambda p: phases.append(p.phase)
    )
    assert "score" in phases and "generate" not in phases


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory) -> Path:
    """One work dir (so one teacher cache) for runs that differ only in the student's objective."""
    return tmp_path_factory.mktemp("shared-work")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_reverse_kl_and_jsd_move_the_student_toward_the_teacher(shared_work, models_root, divergence):
    """The KD term alone (alpha=1: no CE to lean on) must lower the held-out KL to the teacher."""
    over = {**FAST, "divergence": divergence, "alpha": 1.0, "val_every": 10, "init": "base"}  # not from the other run
    out = distill(shared_work, models_root, overrides=over, run_id=divergence, force_publish=True)
    kl = [r["kl"] for r in json.loads((Path(out["adapter_path"]) / "kd_metrics.json").read_text())["val"]]
    assert len(kl) == 3 and kl[2] < kl[1] < kl[0] and kl[2] < 0.97 * kl[0], kl
