"""On-policy distillation and best-checkpoint selection on the tiny fixtures (issue 16): on_policy=0
is today's offline training bit for bit; rollouts are the student's own samples (its current LoRA,
dropout off), deterministic in (seed, step), scored by the teacher's teacher-forced pass; the
rollout buffer survives a checkpoint; cross-tokenizer pairs are refused; select=best publishes the
selected step and patience ends the run early."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import SAMPLES, connect, distill, engine_settings, kd_client, kd_env, venv_bin, wait_status
from structlog.testing import capture_logs

from jobs.config import resolve_config
from jobs.errors import ConfigError, JobInterrupted
from kd_worker.daemon.runtime import Runtime
from kd_worker.engine.batches import OfflineBatches
from kd_worker.engine.cache import TargetCache
from kd_worker.engine.checkpoints import DirCheckpointStore, load_arrays
from kd_worker.engine.data import load_examples, render_prompt, split_examples
from kd_worker.engine.distill import prepare
from kd_worker.engine.hooks import Hooks
from kd_worker.engine.objective import Objective
from kd_worker.engine.onpolicy import OnPolicyBatches, RolloutSettings, on_policy_objective
from kd_worker.engine.teacher import Teacher
from kd_worker.engine.trainer import TrainSchedule, adapter_weights, attach_lora, step_seed, train

PROMPTS = SAMPLES / "memory.jsonl"
SMALL = {"iterations": 12, "gen_max_tokens": 12, "val_every": 6, "save_every": 6, "batch_size": 2, "lora_dropout": 0.1}
TIMING = ("rollout_s", "score_s")


def published(adapter_path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    d = Path(adapter_path)
    arrays = {k: np.array(v) for k, v in load_arrays(d / "adapters.safetensors").items()}
    return arrays, json.loads((d / "kd_metrics.json").read_text())


def test_on_policy_zero_is_todays_offline_training_bit_for_bit(tmp_path, models_root):
    """The job with on_policy=0 (and the default select/patience) against the offline path built
    from the engine's parts as main ran it: OfflineBatches, the job's own schedule, no hooks."""
    overrides = {**SMALL, "on_policy": 0.0}
    out = distill(tmp_path / "job", models_root, overrides=overrides)
    got, metrics = published(out["adapter_path"])

    cfg = resolve_config(overrides)
    settings = engine_settings(tmp_path / "reference")
    runtime = Runtime(settings)
    examples = load_examples((("prompts", PROMPTS),), settings.max_examples)
    teacher = Teacher(runtime.teacher(models_root / "teacher"), TargetCache(tmp_path / "reference" / "cache"))
    with runtime.student(models_root / "student") as student:
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
        data = prepare(teacher, student, train_ex, val_ex, cfg, Hooks())
        attach_lora(student.model, cfg)
        batches = OfflineBatches(data.train, cfg.batch_size, cfg.seed)
        objective = Objective.from_config(cfg, data.plan.student_vocab)
        store = DirCheckpointStore(tmp_path / "reference" / "checkpoints")
        result = train(student, batches, objective, store, Hooks(), TrainSchedule.from_config(cfg), data.val)
        want = {k: np.array(v) for k, v in adapter_weights(student.model).items()}

    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert metrics["train"] == result.history["train"]  # no on-policy keys, every loss equal
    assert metrics["val"] == result.history["val"] and metrics["after"] == result.history["val"][-1]
    assert "on_policy" not in metrics
    assert metrics["selected"] == {"step": SMALL["iterations"], "by": "last", "val_kl": metrics["after"]["kl"]}


@pytest.fixture(scope="module")
def pair(models_root):
    """Teacher and student (LoRA attached, its B matrices randomised so the adapter and its dropout
    change what the student samples), and (student, teacher) prompt ids of the sample prompts."""
    runtime = Runtime(engine_settings(models_root.parent / "onpolicy-pair"))
    teacher = runtime.teacher(models_root / "teacher")
    with runtime.student(models_root / "student") as student:
        cfg = resolve_config({"lora_dropout": 0.5})
        attach_lora(student.model, cfg)
        rng = np.random.default_rng(7)
        student.model.load_weights(
            [
                (k, mx.array(rng.normal(0, 0.5, v.shape).astype(np.float32)))
                for k, v in adapter_weights(student.model).items()
                if k.endswith("lora_b")
            ],
            strict=False,
        )
        examples = load_examples((("prompts", PROMPTS),), 1000)[:6]
        prompts = [
            (render_prompt(student.tokenizer, e.prompt), render_prompt(teacher.tokenizer, e.prompt)) for e in examples
        ]
        yield teacher, student, prompts


def source(pair, **overrides) -> OnPolicyBatches:
    teacher, student, prompts = pair
    cfg = resolve_config(
        {
            "on_policy": 1.0,
            "rollout_every": 2,
            "batch_size": 2,
            "rollout_batch": 3,
            "rollout_max_tokens": 8,
            **overrides,
        }
    )
    n_vocab = min(teacher.n_tokens, student.n_tokens)
    return OnPolicyBatches(
        OfflineBatches([], cfg.batch_size, cfg.seed),
        student,
        teacher,
        prompts,
        RolloutSettings.from_config(cfg, n_vocab),
        on_policy_objective(cfg, n_vocab),
        Hooks(),
    )


def same_batch(a, b) -> bool:
    fields = ("ids", "logp", "tail", "lse_t", "kd_mask")
    return (
        np.array_equal(a.inputs, b.inputs)
        and np.array_equal(a.positions, b.positions)
        and np.array_equal(a.labels, b.labels)
        and all(np.array_equal(getattr(a.targets, f), getattr(b.targets, f)) for f in fields)
    )


def test_rollouts_are_deterministic_in_seed_and_step_and_leave_the_step_as_the_loop_seeded_it(pair):
    _, student, _ = pair
    model = student.model
    model.train()
    a, b = source(pair), source(pair)
    mx.random.seed(step_seed(0, 0))
    first = a.batch(0, model)
    probe = mx.random.uniform(shape=(4,))
    mx.random.seed(step_seed(0, 0))
    assert np.array_equal(np.array(probe), np.array(mx.random.uniform(shape=(4,))))  # LoRA dropout's draws
    assert model.training  # back in train mode after sampling with dropout off
    assert same_batch(first, b.batch(0, model))  # a fresh source, the same (seed, step): the same rollout
    assert first.objective.divergence == "forward_kl" and first.objective.alpha == 1.0
    assert first.info["on_policy"] == 1.0 and first.info["rollout"] == 1.0 and first.info["onpolicy_kl"] > 0
    assert not same_batch(first, source(pair, seed=1).batch(0, model))  # another seed samples afresh
    # the next step of the window trains on the same buffer; a source restored from the state does too
    restored = source(pair)
    restored.load_state({k: np.array(mx.array(v)) for k, v in a.state().items()})  # as a checkpoint keeps it
    nxt = a.batch(1, model)
    again = restored.batch(1, model)
    assert nxt.info["rollout"] == 0.0 and again.info["rollout"] == 0.0
    assert same_batch(nxt, again)
    assert {k: v for k, v in nxt.info.items() if k not in TIMING} == {
        k: v for k, v in again.info.items() if k not in TIMING
    }
    assert a.batch(2, model).info["rollout"] == 1.0  # a new window refreshes


def test_rollouts_are_the_students_greedy_samples_scored_by_a_dense_teacher_forward(pair):
    teacher, student, prompts = pair
    src = source(pair, rollout_temperature=0.0, top_k=16)
    student.model.train()
    src.batch(0, student.model)
    n_vocab = src.s.n_vocab
    student.model.eval()  # dropout off, as while sampling
    try:
        for seq in src.buffer:
            sp = seq.tokens[: seq.resp_start].tolist()
            resp = seq.tokens[seq.resp_start :].tolist()
            tp = next(t for s, t in prompts if s == sp)
            logits = np.array(student.model(mx.array([sp + resp]))[0, len(sp) - 1 :, :n_vocab].astype(mx.float32))
            for j, tok in enumerate(resp):  # each token is the student's argmax (or a float tie)
                assert tok == logits[j].argmax() or logits[j].max() - logits[j, tok] < 1e-4, (j, tok)
            # one response position against the teacher's dense log-softmax over the vocabulary
            j = len(resp) // 2
            dense = teacher.model(mx.array([tp + resp]))[0, len(tp) - 1 + j, :n_vocab].astype(mx.float32)
            logp = np.array(dense - mx.logsumexp(dense))
            top = np.argsort(-logp)[:16]
            assert set(seq.targets.ids[j].tolist()) == set(top.tolist())
            np.testing.assert_allclose(seq.targets.logp[j], logp[seq.targets.ids[j]], atol=1e-4)
            tail = np.log(np.exp(logp).sum() - np.exp(logp[top]).sum())
            np.testing.assert_allclose(seq.targets.tail[j], tail, atol=1e-3)
    finally:
        student.model.train()


def test_on_policy_is_refused_for_a_cross_tokenizer_pair_before_any_teacher_work(tmp_path, models_root):
    with capture_logs() as logs, pytest.raises(ConfigError, match="cross-tokenizer.*on_policy=0"):
        distill(tmp_path, models_root, student="student-llama", overrides={**SMALL, "on_policy": 0.5})
    assert not [e for e in logs if e["event"] in ("teacher_responses", "teacher_targets")]


def test_cli_on_policy_run_publishes_with_the_rollout_share_and_a_falling_on_policy_kl(tmp_path, models_root):
    import subprocess

    env = kd_env(
        KD_WORK_DIR=str(tmp_path / "work"),
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
    )
    sets = {"on_policy": 1.0, "iterations": 20, "gen_max_tokens": 16, "val_every": 10, "save_every": 10}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run(
        [venv_bin("kd-worker"), "distill", "--domain", "memory", "--prompts", str(PROMPTS), *args]
        + ["--out", str(tmp_path / "out"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _, metrics = published(json.loads(out.stdout)["adapter_path"])
    rows = metrics["train"]
    assert [r["rollout_share"] for r in rows] == [1.0] * 20 and all(r["on_policy"] == 1.0 for r in rows)
    assert all(r["rollout"] == 1.0 and r["rollout_s"] > 0 and r["score_s"] > 0 for r in rows)
    kl = [r["onpolicy_kl"] for r in rows]
    assert np.mean(kl[-5:]) < 0.8 * np.mean(kl[:5])  # the student moves toward the teacher on its own samples
    doc = metrics["on_policy"]
    assert doc["steps"] == 20 and doc["rollouts"] == 20 and doc["kl_last"] == kl[-1]


def test_select_best_with_patience_publishes_the_selected_step_and_stops_early(tmp_path, models_root):
    overrides = {
        "iterations": 60,
        "gen_max_tokens": 16,
        "val_every": 4,
        "save_every": 30,
        "learning_rate": 0.01,  # fast enough that the held-out KL turns up within 60 steps
        "val_fraction": 0.25,
        "select": "best",
        "patience": 2,
    }
    out = distill(tmp_path, models_root, overrides=overrides)
    got, metrics = published(out["adapter_path"])
    kls = [(r["step"], r["kl"]) for r in metrics["val"] if r["step"] > 0]
    best_step, best_kl = min(kls, key=lambda x: x[1])
    assert metrics["selected"] == {"step": best_step, "by": "val_kl", "val_kl": best_kl}
    # patience: the run ended two validations after its best, before its 60 steps
    assert len(metrics["train"]) < 60 and kls[-1][0] == len(metrics["train"])
    assert [s for s, _ in kls].index(best_step) == len(kls) - 3
    # the published adapter is the selected step's checkpoint, and "after" (what the gate compares) its validation
    ckpt = {
        k: np.array(v)
        for k, v in load_arrays(Path(out["adapter_path"]) / f"checkpoint_{best_step}" / "adapters.safetensors").items()
    }
    assert got.keys() == ckpt.keys() and all(np.array_equal(got[k], ckpt[k]) for k in got)
    assert metrics["after"]["step"] == best_step and out["after"]["kl"] == best_kl

    # interrupted between the last two validations and resumed: patience counts the validations
    # before the checkpoint too, so the resumed run ends where the uninterrupted one did
    end, seen = len(metrics["train"]), {"step": 0}

    def progress(p):
        if p.phase == "train":
            seen["step"] = p.step

    with pytest.raises(JobInterrupted):
        distill(
            tmp_path / "resumed",
            models_root,
            overrides=overrides,
            progress=progress,
            should_stop=lambda: "shutdown" if seen["step"] >= end - 2 else None,
        )
    again = distill(tmp_path / "resumed", models_root, overrides=overrides)
    got2, metrics2 = published(again["adapter_path"])
    assert metrics2["timing"]["resumed_from"] == end - 2
    assert metrics2["train"] == metrics["train"] and metrics2["selected"] == metrics["selected"]
    assert all(np.array_equal(got2[k], got[k]) for k in got)


def test_kd_client_submit_on_policy_with_select_best_publishes_the_selected_step(env, worker):
    worker()
    sets = {"on_policy": 1.0, "iterations": 20, "select": "best", "patience": 2, "val_every": 5}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = kd_client(env, "submit", "--domain", "memory", "--prompts", str(PROMPTS), *args)
    assert out.returncode == 0, out.stderr
    st = wait_status(connect(env), out.stdout.split()[0], {"finished"}, timeout=600)
    assert st["outcome"]["published"]
    _, metrics = published(st["outcome"]["adapter_path"])
    kls = [(r["step"], r["kl"]) for r in metrics["val"] if r["step"] > 0]
    step, kl = min(kls, key=lambda x: x[1])
    assert metrics["selected"] == {"step": step, "by": "val_kl", "val_kl": kl}
    assert metrics["after"]["step"] == step and st["outcome"]["after"]["kl"] == kl
    assert all(r["rollout_share"] == 1.0 and "onpolicy_kl" in r for r in metrics["train"])
    assert metrics["on_policy"]["kl_last"] < metrics["on_policy"]["kl_first"]
