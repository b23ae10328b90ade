"""What on-policy distillation costs (issue 16): one on-policy step split into rollout (the
student samples), scoring (the teacher's teacher-forced pass into top-k + tail targets), the
on-policy KL probe and the update, beside one off-policy step; and the daemon's per-job time
(`run_job`, what the queue worker runs for every job) with on_policy 0 / 0.5 / 1.0.

    .venv/bin/python -m bench.onpolicy_cost [--vocab 151936] [--batch 4] [--prompt 64] [--response 32]

Step rows: a Qwen2-shaped student (bench.step's body) with LoRA on every layer and a teacher of
the same shape (another seed), random weights (the cost does not depend on what they learned),
at each V; plus the tiny demo pair (V = 1,000). Rollouts sample `--response` tokens (random
weights rarely stop early). The off-policy step trains a batch of the same shape on
precomputed targets (forward KL, the fused path); the on-policy update is reverse KL (autodiff).
Per-job rows: the tiny demo pair and the bundled `memory` prompts, 20 steps, batch 4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import best_of, report  # first: loads OpenBLAS before mlx
from bench.step import BODY, student


def lm_pair(vocab: int):
    """(student LoadedModel with LoRA, teacher LoadedModel) of one shape; a stub tokenizer whose
    stop token the random models rarely draw, so rollouts run to their budget."""
    import mlx.core as mx
    from mlx_lm.models import qwen2

    from kd_worker.engine.models import LoadedModel, split_model

    stu, cfg = student(vocab, BODY)
    stu.tokenizer = SimpleNamespace(eos_token_ids={vocab - 1})
    mx.random.seed(1)
    args = qwen2.ModelArgs(model_type="qwen2", rms_norm_eps=1e-6, vocab_size=vocab, tie_word_embeddings=True, **BODY)
    model = qwen2.Model(args)
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    tok = SimpleNamespace(eos_token_ids={vocab - 1})
    return stu, LoadedModel(Path("."), model, tok, "", "", vocab, vocab, split_model(model)), cfg


def step_costs(stu, teacher, cfg, batch: int, prompt: int, response: int, repeats: int) -> dict[str, float]:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from kd_worker.engine.data import StudentSequence, collate
    from kd_worker.engine.objective import Objective, to_mx_targets, uld_rows
    from kd_worker.engine.onpolicy import RolloutSettings, score_rollouts, student_kl
    from kd_worker.engine.teacher import generate, make_sampler
    from kd_worker.engine.trainer import make_step

    v = stu.n_tokens
    cfg = cfg.model_copy(update={"on_policy": 1.0, "rollout_max_tokens": response, "max_seq_length": 4096})
    s = RolloutSettings.from_config(cfg, v)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, v - 1, prompt).tolist() for _ in range(batch)]
    sampler = make_sampler(1.0, 0, 1.0, v)
    out: dict[str, list[int]] = {}

    def rollout():
        stu.model.eval()
        mx.random.seed(0)
        out["r"] = generate(stu, prompts, [response] * batch, sampler, batch)
        stu.model.train()

    rollout()
    pairs = list(zip(prompts, out["r"], strict=True))
    targets = score_rollouts(teacher, pairs, s)
    b = collate(
        [StudentSequence(np.asarray(p + r, np.int32), len(p), t) for (p, r), t in zip(pairs, targets, strict=True)]
    )
    args = (mx.array(b.inputs), mx.array(b.positions), tuple(to_mx_targets(b)), uld_rows(b))
    on_step, on_state = make_step(stu, Objective(v, cfg.temperature, 1.0, "reverse_kl"), optim.Adam(learning_rate=1e-5))
    off_step, off_state = make_step(stu, Objective.from_config(cfg, v), optim.Adam(learning_rate=1e-5))
    return {
        "rollout": best_of(rollout, repeats, warmup=0),
        "score": best_of(lambda: score_rollouts(teacher, pairs, s), repeats),
        "kl_probe": best_of(lambda: student_kl(stu, b, v), repeats),
        "update_on": best_of(lambda: mx.eval(on_state, on_step(*args)), repeats, warmup=2),
        "update_off": best_of(lambda: mx.eval(off_state, off_step(*args)), repeats, warmup=2),
        "tokens": b.n_tokens,
    }


def tiny_pair(root: Path):
    from jobs.config import KDConfig
    from kd_worker.engine.models import load_model_dir
    from kd_worker.engine.trainer import attach_lora
    from kd_worker.fixtures.tinymodels import build_demo_models

    build_demo_models(root, ("teacher", "student"))
    stu, teacher = load_model_dir(root / "student"), load_model_dir(root / "teacher")
    cfg = KDConfig()
    attach_lora(stu.model, cfg)
    return stu, teacher, cfg


def job_times(root: Path, shares: list[float], iterations: int) -> list[dict]:
    """run_job (the daemon's per-job function) on the tiny pair, one fresh work dir per share."""
    from jobs.config import resolve_config
    from kd_worker.daemon.lifecycle import run_job
    from kd_worker.daemon.runtime import Runtime
    from kd_worker.engine.hooks import Hooks
    from kd_worker.engine.types import DistillRequest
    from kd_worker.fixtures.tinymodels import bundled_prompts
    from kd_worker.settings import WorkerSettings

    prompts = root / "memory.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in bundled_prompts()[:12]))
    rows = []
    for share in shares:
        work = root / f"job-{share}"
        s = WorkerSettings(work_dir=work / "work", adapters_dir=work / "adapters_kd")
        req = DistillRequest("memory", (("prompts", prompts),), root / "teacher", root / "student", f"bench-{share}")
        over = {"iterations": iterations, "gen_max_tokens": 24, "val_every": iterations, "save_every": iterations}
        cfg = resolve_config({**over, "batch_size": 4, "on_policy": share})
        outcome = run_job(req, cfg, Runtime(s), s, Hooks())
        m = json.loads((Path(outcome["adapter_path"]) / "kd_metrics.json").read_text())
        op = m.get("on_policy") or {}
        rows.append(
            {
                "on_policy": share,
                "job_s": outcome["seconds"],
                "teacher_s": m["timing"]["teacher_s"],
                "train_s": m["timing"]["train_s"],
                "rollout_s": op.get("rollout_s", 0.0),
                "score_s": op.get("score_s", 0.0),
            }
        )
        print(f"job on_policy={share}: {outcome['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[151936])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20, help="steps of each per-job run")
    args = ap.parse_args()
    t_start, rows, raw = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [
            (f"V={v}, body {BODY['hidden_size']}x{BODY['num_hidden_layers']}", lambda v=v: lm_pair(v))
            for v in args.vocab
        ]
        pairs.append(("tiny demo pair (V=1,000)", lambda: tiny_pair(Path(tmp) / "tiny")))
        for name, make in pairs:
            stu, teacher, cfg = make()
            t = step_costs(stu, teacher, cfg, args.batch, args.prompt, args.response, args.repeats)
            raw[name] = t
            on = t["rollout"] + t["score"] + t["kl_probe"] + t["update_on"]
            rows.append(
                [name, *(t[k] * 1e3 for k in ("rollout", "score", "kl_probe", "update_on")), on * 1e3]
                + [t["update_off"] * 1e3, on / t["update_off"]]
            )
            print(f"{name}: on-policy {on * 1e3:.0f} ms, off-policy {t['update_off'] * 1e3:.0f} ms", flush=True)
        jobs = job_times(Path(tmp) / "tiny", [0.0, 0.5, 1.0], args.iterations)
    report(
        "onpolicy_cost",
        f"on-policy step vs off-policy step, B={args.batch} prompt={args.prompt} response={args.response}",
        [
            "pair",
            "rollout ms",
            "score ms",
            "KL probe ms",
            "update ms",
            "on-policy step ms",
            "off-policy step ms",
            "ratio",
        ],
        rows,
        {
            "steps": raw,
            "jobs": jobs,
            "job_settings": {"iterations": args.iterations, "batch_size": 4, "gen_max_tokens": 24, "prompts": 12},
            "contention": "timed on a shared 2-core VM with other work running",
            "total_s": time.perf_counter() - t_start,
        },
    )
    for j in jobs:
        print(
            f"per job, on_policy={j['on_policy']}: {j['job_s']:.1f} s (teacher phase {j['teacher_s']:.1f} s, "
            f"training {j['train_s']:.1f} s of which rollouts {j['rollout_s']:.1f} s and scoring {j['score_s']:.1f} s)"
        )


if __name__ == "__main__":
    main()
