"""Real sizes (issue 14): Qwen2.5-shaped random-init models with the real 151,665-token vocabulary.

1. peaks   the LM head and loss at V = 151,936 (production chunk size, a small body): MLX's peak of
           a validation batch and a training step, body alone vs body + head + loss, in chunks.
2. job     one full `kd-worker distill --json` job: a Qwen2.5-0.5B-shaped student (bf16 checkpoint)
           and a Qwen2.5-1.5B-shaped teacher quantized to 4 bits by mlx-lm's own `convert`
           (dequantized to float32 at load on the CPU when the plan fits): time per phase,
           tokens/s, MLX peak and process peak RSS, adapter size, bytes per stored target token,
           and the memory plan's estimate beside each measured peak.
3. timing  the same 1.5B teacher scoring the same rows quantized vs dequantized (CPU backend).
4. design  the design's pair: a Qwen2.5-7B-Instruct-shaped 4-bit teacher and a Qwen2.5-3B-shaped
           4-bit student, built layer by layer (never float32), loaded whole (resident memory);
           batched decode steps (KV cache) and a scoring pass on 2 blocks of the 7B shape (a
           quantized matmul on this CPU backend runs at well under 1 GFLOP/s: the whole 7B would
           take minutes per row); then the plan for a 16 GB Mac beside the design's claim
           ("~10-12 GB total, fits a 16 GB Mac").

Each part runs in its own process (`--part`), so peaks and RSS are its own. Models are built once
into .kd/realsize/ (about 11 GB; reused while their recipe is unchanged).

    .venv/bin/python -m bench.realsize            # everything (~30-60 min on 2 shared cores)
    .venv/bin/python -m bench.realsize --skip-design
    make bench-realsize
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, report

ROOT = REPO / ".kd" / "realsize"
GB = 1e9
BF16 = "bfloat16"  # the published checkpoints' dtype
DESIGN_CLAIM = "~10-12 GB total, fits a 16 GB Mac"
MAC16_WORKING_SET = 11_453_251_584  # recommendedMaxWorkingSetSize of a 16 GB M-series Mac (10.67 GiB)


def peak_rss_bytes(ru_maxrss: int) -> int:
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def run_part(part: str, args: argparse.Namespace, timeout: float = 7200) -> dict[str, Any]:
    """One part in its own process; it prints its result as the last line of stdout."""
    cmd = [sys.executable, "-m", "bench.realsize", "--part", part, "--root", str(args.root)]
    cmd += ["--prompts", str(args.prompts), "--gen-tokens", str(args.gen_tokens), "--steps", str(args.steps)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"part {part} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["part_seconds"] = time.perf_counter() - t0
    return result


# --- models --------------------------------------------------------------------------------------
def models(root: Path, layers: int | None) -> dict[str, Path]:
    """The job's pair (built on first use): 0.5B student as a bf16 checkpoint, 1.5B teacher
    converted to 4 bits by mlx-lm."""
    from kd_worker.fixtures.qwenvocab import build_qwen_shaped, quantize_with_mlx_lm

    tok = root / "qwen-tokenizer"
    sfx = f"-{layers}L" if layers else ""
    student = build_qwen_shaped(root / f"qwen2.5-0.5b{sfx}", "0.5B", BF16, layers=layers, tokenizer_cache=tok)
    teacher_bf16 = build_qwen_shaped(root / f"qwen2.5-1.5b{sfx}", "1.5B", BF16, layers=layers, tokenizer_cache=tok)
    teacher = quantize_with_mlx_lm(teacher_bf16, root / f"qwen2.5-1.5b{sfx}-4bit", bits=4)
    return {"student": student, "teacher": teacher}


def design_models(root: Path) -> dict[str, Path]:
    """7B and 3B shapes quantized as they are written (no float32 copy), and 2 blocks of the 7B shape."""
    from kd_worker.fixtures.qwenvocab import build_qwen_shaped

    tok = root / "qwen-tokenizer"
    return {
        "teacher": build_qwen_shaped(root / "qwen2.5-7b-4bit", "7B", BF16, bits=4, tokenizer_cache=tok),
        "student": build_qwen_shaped(root / "qwen2.5-3b-4bit", "3B", BF16, bits=4, tokenizer_cache=tok),
        "teacher_2L": build_qwen_shaped(root / "qwen2.5-7b-2L-4bit", "7B", BF16, bits=4, layers=2, tokenizer_cache=tok),
    }


# --- part 1: peaks at Qwen's vocabulary ------------------------------------------------------------
V = 151_936  # Qwen2.5-0.5B..3B embedding rows
N_TOKENS = 151_665  # len(tokenizer): the logits' columns (the rest of the embedding is padding)
PEAK_BODY = {  # a small Qwen2 body: the head and loss decide the peak
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def qwen_batch(rows: int, prompt: int = 8, k: int = 64, uld_every: int = 0):
    """A batch of 4 sequences with `rows` response positions over Qwen's tokens and random sparse
    targets (every `uld_every`-th row a cross-tokenizer ULD row)."""
    import numpy as np

    from kd_worker.engine.data import Batch, SoftTargets

    rng = np.random.default_rng(0)
    b, response = 4, rows // 4
    length = prompt + response
    tokens = rng.integers(0, N_TOKENS, (b, length)).astype(np.int32)
    pos = np.concatenate([i * (length - 1) + prompt - 1 + np.arange(response) for i in range(b)]).astype(np.int32)
    n = b * response
    ids = np.stack([rng.choice(N_TOKENS, k, replace=False) for _ in range(n)]).astype(np.int32)
    lp = -np.sort(rng.exponential(2.0, (n, k)), axis=-1) - 1.0
    tail = np.log1p(-np.exp(lp).sum(-1).clip(max=0.99))
    uld = np.zeros(n, np.float32)
    if uld_every:
        uld[::uld_every] = 1.0
    t = SoftTargets(ids, lp.astype(np.float32), tail.astype(np.float32), np.full(n, 0.5, np.float32), 1.0 - uld, uld)
    return Batch(tokens[:, :-1], pos, tokens[:, prompt:].reshape(-1), t)


def added_peak(fn) -> int:
    """Bytes MLX's peak rose above the memory in use before `fn` ran (after one warm-up call:
    compiled kernels and lazily created state such as Adam's exist before measuring)."""
    import mlx.core as mx

    mx.eval(fn())
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


def part_peaks(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from bench.step import student
    from jobs.config import KDConfig
    from kd_worker.engine import objective as OBJ
    from kd_worker.engine.models import hidden_at
    from kd_worker.engine.trainer import make_step

    lm, _ = student(V, PEAK_BODY)
    b = qwen_batch(1024)  # 4 x 256 response rows, the measurement
    x, pos, t, uld = mx.array(b.inputs), mx.array(b.positions), tuple(OBJ.to_mx_targets(b)), OBJ.uld_rows(b)
    obj = OBJ.Objective.from_config(KDConfig(lora_layers=-1), N_TOKENS)
    chunk = OBJ.chunk_bytes(N_TOKENS)
    lm.model.eval()
    t0 = time.perf_counter()
    val = added_peak(lambda: mx.array(obj.measure(lm, b)))
    val_s = (time.perf_counter() - t0) / 2
    body_fwd = added_peak(lambda: hidden_at(lm, x, pos))
    lm.model.train()
    grad = nn.value_and_grad(lm.model, lambda m: hidden_at(lm, x, pos).sum())
    body_bwd = added_peak(lambda: grad(lm.model))
    step, state = make_step(lm, obj, optim.Adam(learning_rate=1e-5))
    t0 = time.perf_counter()
    train = added_peak(lambda: [state, step(x, pos, t, uld)])
    train_s = (time.perf_counter() - t0) / 2
    return {
        "vocab": V,
        "rows": int(len(b.labels)),
        "chunk_bytes": chunk,
        "chunk_rows": OBJ.chunk_rows(N_TOKENS),
        "validation": {"body": body_fwd, "whole": val, "seconds": val_s},
        "train_step": {"body": body_bwd, "whole": train, "seconds": train_s},
    }


# --- part 2: one distill job ---------------------------------------------------------------------
def write_prompts(path: Path, n: int) -> Path:
    from bench.common import sample_prompts

    prompts = sample_prompts()
    path.write_text("".join(json.dumps({"prompt": prompts[i % len(prompts)]}) + "\n" for i in range(n)))
    return path


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The job's KD settings (the job and SIGTERM parts run the same job)."""
    return {
        "gen_max_tokens": args.gen_tokens,
        "iterations": args.steps,
        "val_every": max(1, args.steps // 2),
        "save_every": args.steps,
        "batch_size": 4,
        "val_fraction": 0.2,
    }


def part_job(args: argparse.Namespace) -> dict[str, Any]:
    """`kd-worker distill --json` as a user runs it; its JSON log (stderr) gives the plan and phases."""
    paths = models(args.root, args.layers)
    work = Path(tempfile.mkdtemp(prefix="kd-realsize-"))
    prompts = write_prompts(work / "prompts.jsonl", args.prompts)
    env = {
        **os.environ,
        "KD_WORK_DIR": str(work / "work"),
        "KD_LOG_FORMAT": "json",
        "KD_REDIS_URL": "redis://127.0.0.1:1/0",  # never used by distill
    }
    sets = job_settings(args)
    cmd = [str(REPO / ".venv" / "bin" / "kd-worker"), "distill", "--json", "--domain", "bench"]
    cmd += ["--prompts", str(prompts), "--teacher", str(paths["teacher"]), "--student", str(paths["student"])]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--out", str(work / "adapters_kd")]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    if out.returncode not in (0, 3):
        raise RuntimeError(f"distill failed ({out.returncode}): {out.stderr[-4000:]}")
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    outcome = json.loads(out.stdout)
    adapter = Path(outcome["adapter_path"])
    metrics = json.loads((adapter / "kd_metrics.json").read_text())
    adapter_bytes = (adapter / "adapters.safetensors").stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return {
        "settings": sets,
        "prompts": args.prompts,
        "wall_s": wall,
        "peak_rss": peak_rss_bytes(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
        "adapter_bytes": adapter_bytes,
        "metrics": {k: metrics[k] for k in ("timing", "targets", "data", "before", "after")},
        "events": [e for e in events if e["event"] in KEEP_EVENTS],
    }


KEEP_EVENTS = {"memory_plan", "phase_finished", "model_loaded", "teacher_dequantized", "teacher_kept_quantized"}


# --- part 3: quantized vs dequantized teacher on the CPU -----------------------------------------
def part_timing(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np

    from kd_worker.engine import teacher as T
    from kd_worker.engine.models import load_model_dir, resident_bytes

    path = models(args.root, args.layers)["teacher"]
    rng = np.random.default_rng(0)
    seqs = [(list(rng.integers(0, 150_000, 16)), list(rng.integers(0, 150_000, 17))) for _ in range(2)]
    rows = sum(len(r) for _, r in seqs)
    out: dict[str, Any] = {"rows": rows}
    for form in ("dequantized", "quantized"):
        lm = load_model_dir(path, dequantize=form == "dequantized")
        T.score(lm, seqs[:1], lm.n_tokens, 64, 2.0)  # warm-up: kernels compiled
        t0 = time.perf_counter()
        T.score(lm, seqs, lm.n_tokens, 64, 2.0)
        seconds = time.perf_counter() - t0
        out[form] = {"seconds": seconds, "rows_per_s": rows / seconds, "resident": resident_bytes(lm.model)}
        del lm
        mx.clear_cache()
    out["slowdown"] = out["quantized"]["seconds"] / out["dequantized"]["seconds"]
    return out


# --- part 3b: SIGTERM to exit, at the job's shape -------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()) is not None:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def sigterm_triggers(val_every: int) -> dict[str, Any]:
    """For each phase, when to send SIGTERM so that the longest unit of work between two stop
    checks runs whole (the worst case), from (job progress in Redis, the worker's log events):
    - generate: the first batch's progress; the next batch's prefill and 32 decode steps run
      before the next check;
    - score: the log line that opens scoring (`teacher_targets`): the check just passed, a whole
      scoring batch (4,096 tokens) runs;
    - train+validate: the progress of the step before a validation: one training step and one
      validation batch run (validation checks after each batch);
    - gate+publish: the gate's progress: the gate (one validation batch at most) and publishing,
      which is not interruptible, run; the job finishes."""

    def generate(p: dict[str, Any], events: list[dict[str, Any]]) -> bool:
        return p.get("phase") == "generate" and 1 <= p.get("step", 0) < p.get("total", 0)

    def score(p: dict[str, Any], events: list[dict[str, Any]]) -> bool:
        return any(e.get("event") == "teacher_targets" and e.get("to_score", 0) > 0 for e in events)

    def train(p: dict[str, Any], events: list[dict[str, Any]]) -> bool:
        return p.get("phase") == "train" and p.get("step", 0) % val_every == val_every - 1

    def gate(p: dict[str, Any], events: list[dict[str, Any]]) -> bool:
        return p.get("phase") in ("validate", "publish")

    return {"generate": generate, "score": score, "train+validate": train, "gate+publish": gate}


def stop_in_phase(phase: str, trigger, env: dict[str, str], log_path: Path, progress) -> dict[str, Any]:
    """Start `kd-worker run`, wait for `trigger(progress written since it started, its log
    events)`, SIGTERM it, and time until it has exited."""
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "kd-worker"), "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        started = time.time()

        def fired() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
            p = progress()
            p = p if p.get("updated_at", 0) > started else {}
            events = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
            if trigger(p, events):
                return p or {"events": len(events)}
            # the moment passed unseen (a sub-second gate): the worker is idle, its exit says nothing
            return {"missed": True} if any(e.get("event") == "job_finished" for e in events) else None

        try:
            seen = wait_until(fired, 3600, f"the moment to stop {phase}")
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=3600)
            seconds = time.perf_counter() - t0
        finally:
            if proc.poll() is None:  # a wait failed: leave no worker behind
                proc.kill()
                proc.wait(timeout=60)
    events = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    interrupted = [e for e in events if e.get("event") == "job_interrupted"]
    return {
        "seconds": seconds,
        "exit_code": code,
        "at": {k: seen.get(k) for k in ("phase", "step", "total")},
        "interrupted": interrupted[-1]["reason"] if interrupted else None,
        "finished": any(e.get("event") == "job_finished" for e in events),
        "missed": bool(seen.get("missed")),
    }


def part_sigterm(args: argparse.Namespace) -> dict[str, Any]:
    """`kd-worker run` (the service) on the job's pair and settings, one job (16 prompts: two
    generation batches) through a real redis-server; in each phase SIGTERM at its worst moment
    (`sigterm_triggers`), then the time until the process has exited. A fresh worker resumes the
    job (teacher work cached, training from its checkpoint) for the next phase."""
    import redis

    from kd_client import queue as Q

    paths = models(args.root, args.layers)
    work = Path(tempfile.mkdtemp(prefix="kd-realsize-term-"))
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conn = redis.Redis(port=port)
    env = {
        **os.environ,
        "KD_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "KD_TEACHER": str(paths["teacher"]),
        "KD_STUDENT": str(paths["student"]),
        "KD_WORK_DIR": str(work / "work"),
        "KD_ADAPTERS_DIR": str(work / "adapters_kd"),
        "KD_SPOOL_DIR": str(work / "spool"),
        "KD_LOG_FORMAT": "json",
        "KD_WORKER_NAME": "realsize-bench",
    }
    sets = job_settings(args)
    stops: dict[str, Any] = {}
    try:
        wait_until(lambda: conn.ping() or None, 30, "redis-server")
        prompts = write_prompts(work / "prompts.jsonl", 16)
        cmd = [str(REPO / ".venv" / "bin" / "kd-client"), "submit", "--domain", "bench", "--prompts", str(prompts)]
        cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--force", "--json"]
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
        job_id = json.loads(sub.stdout)[0]["job_id"]

        def progress() -> dict[str, Any]:
            job = Q.fetch(conn, job_id)
            return (Q.describe(job) if job else {}).get("progress") or {}

        for phase, trigger in sigterm_triggers(sets["val_every"]).items():
            stops[phase] = stop_in_phase(phase, trigger, env, work / f"worker-{phase}.log", progress)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    worst = max((k for k in stops if not stops[k]["missed"]), key=lambda k: stops[k]["seconds"])
    return {"settings": sets, "prompts": 16, "phases": stops, "worst_phase": worst, "worst_s": stops[worst]["seconds"]}


# --- part 4: the design's pair ---------------------------------------------------------------------
def part_design_load(args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory of the whole 7B and 3B 4-bit models as loaded on this CPU backend."""
    import mlx.core as mx

    from kd_worker.engine import memory as M
    from kd_worker.engine.models import load_model_dir, resident_bytes

    paths = design_models(args.root)
    out: dict[str, Any] = {}
    resident = []  # both stay loaded, as in the worker
    for name in ("teacher", "student"):
        base = mx.get_active_memory()
        lm = load_model_dir(paths[name])
        resident.append(lm)
        dims = M.read_dims(paths[name])
        out[name] = {
            "path": str(paths[name]),
            "active_bytes": mx.get_active_memory() - base,
            "resident": resident_bytes(lm.model),
            "estimate_cpu": M.weight_bytes(dims, 4),
            "estimate_metal": M.weight_bytes(dims, dims.dtype_bytes),
            "on_disk": sum(f.stat().st_size for f in paths[name].glob("*.safetensors")),
        }
    out["both_active_bytes"] = mx.get_active_memory()
    out["peak_rss"] = peak_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return out


def part_design_run(args: argparse.Namespace) -> dict[str, Any]:
    """2 blocks of the 7B shape: batched prefill + decode (KV cache), then one scoring pass."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    from jobs.config import KDConfig
    from kd_worker.engine import memory as M
    from kd_worker.engine import teacher as T
    from kd_worker.engine.models import load_model_dir

    path = design_models(args.root)["teacher_2L"]
    lm = load_model_dir(path)
    dims = M.read_dims(path)
    batch, prompt, steps = 8, 8, 3
    rng = np.random.default_rng(0)
    cache = make_prompt_cache(lm.model)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    mx.eval(lm.model.model(mx.array(rng.integers(0, 150_000, (batch, prompt))), cache=cache))  # prefill: no head
    prefill_s = time.perf_counter() - t0
    token = mx.array(rng.integers(0, 150_000, (batch, 1)))
    t0 = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(lm.model(token, cache=cache)[:, -1:, :], axis=-1)
        mx.eval(token)
    decode_s = (time.perf_counter() - t0) / steps
    kv = sum(c.nbytes for c in cache)
    decode_peak = mx.get_peak_memory() - base
    del cache
    mx.clear_cache()
    seqs = [(list(rng.integers(0, 150_000, 8)), list(rng.integers(0, 150_000, 24)))]
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    T.score(lm, seqs, lm.n_tokens, 64, 2.0)
    score_s = time.perf_counter() - t0
    score_peak = mx.get_peak_memory() - base
    width = len(seqs[0][0]) + len(seqs[0][1]) - 1
    shape = M.JobShape(8, width, 1)
    plan = M.plan_job(dims, dims, KDConfig(max_seq_length=width), shape, M.Precision(4, 4))
    return {
        "layers": dims.layers,
        "kv_cache": {
            "batch": batch,
            "tokens": prompt + steps,
            "measured": kv,
            "estimate": M.kv_cache_bytes(dims, batch, prompt + steps, 4),
            "per_layer_per_token_slot": kv / dims.layers / batch / M.KV_STEP,
        },
        "decode": {"prefill_s": prefill_s, "step_s": decode_s, "peak_above_weights": decode_peak},
        "score": {
            "rows": len(seqs[0][1]),
            "seconds": score_s,
            "peak_above_weights": score_peak,
            "estimate": plan.phase_total("score"),
        },
    }


MAC16_SETTINGS: tuple[tuple[str, dict[str, int]], ...] = (
    ("defaults (batch_size 4, max_seq_length 512)", {}),
    ("batch_size 2", {"batch_size": 2}),
    ("max_seq_length 256", {"max_seq_length": 256}),
    ("batch_size 1, max_seq_length 1024", {"batch_size": 1, "max_seq_length": 1024}),
    ("batch_size 2, max_seq_length 1024", {"batch_size": 2, "max_seq_length": 1024}),
    ("batch_size 8", {"batch_size": 8}),
    (
        "batch_size 2, gen_batch_size 32, gen_max_tokens 512",
        {"batch_size": 2, "gen_batch_size": 32, "gen_max_tokens": 512},
    ),
)


def design_plans() -> dict[str, Any]:
    """The plan of the design's pair on a 16 GB Mac (bf16 compute, 64-token prompts) at the
    default settings and around them, each against the Mac's default budget; `refusal` is what a
    job at the defaults is told (the setting to lower and the value that fits)."""
    from jobs.config import KDConfig
    from jobs.errors import ResourceLimitExceeded
    from kd_worker.engine import memory as M
    from kd_worker.fixtures.qwenvocab import qwen25_config

    teacher = M.ModelDims.from_config(qwen25_config("7B", BF16, bits=4))
    student = M.ModelDims.from_config(qwen25_config("3B", BF16, bits=4))
    mac = M.Backend(True, {"max_recommended_working_set_size": MAC16_WORKING_SET}, 16 << 30)
    budget = M.job_budget(None, mac)
    precision = M.Precision.for_backend(teacher, student, "auto", cpu=False)

    def plan_for(cfg: KDConfig) -> M.MemoryPlan:
        return M.plan_job(teacher, student, cfg, M.JobShape(64), precision)

    rows = {}
    for name, sets in MAC16_SETTINGS:
        plan = plan_for(KDConfig(**sets))
        rows[name] = {**plan.as_dict(), "settings": sets, "fits_default_budget": plan.fits(budget.bytes)}
    try:
        M.check_plan(plan_for, KDConfig(), budget.bytes, budget.source)
        refusal = None
    except ResourceLimitExceeded as e:
        refusal = str(e)
    return {"budget": budget.bytes, "budget_source": budget.source, "plans": rows, "defaults_refused": refusal}


# --- the report ------------------------------------------------------------------------------------
def phase_rows(job: dict[str, Any]) -> list[list[Any]]:
    plan = next(e for e in job["events"] if e["event"] == "memory_plan")
    phases = [e for e in job["events"] if e["event"] == "phase_finished"]
    metrics = job["metrics"]
    rows = []
    est = {p: plan["teacher"] + plan["student"] + v["total"] for p, v in plan["phases"].items()}
    tokens = {"generate": metrics["data"]["response_tokens"], "score": metrics["targets"]["tokens"]}
    for e in phases:
        phase = e["phase"]
        rate = e.get("tokens_per_s") or (tokens[phase] / e["seconds"] if phase in tokens and e["seconds"] else None)
        rows.append(
            [phase, round(e["seconds"], 1), rate and round(rate, 1), e["mlx_peak_bytes"] / GB, est.get(phase, 0) / GB]
        )
    return rows


PARTS = ("peaks", "job", "timing", "sigterm", "design")


def previous_results(results_dir: Path, parts: set[str]) -> dict[str, Any]:
    """The parts of an earlier realsize.json that this run does not redo (`--only` runs add to it)."""
    try:
        doc = json.loads((results_dir / "realsize.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: doc[k] for k in PARTS if k in doc and k not in parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("peaks", "job", "timing", "sigterm", "design-load", "design-run"))
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, help="build the job's models this deep (a quick run), not the real depth")
    p.add_argument("--skip-design", action="store_true", help="skip the 7B + 3B part (11 GB of models)")
    p.add_argument(
        "--only", nargs="+", choices=PARTS, help="run only these parts (the others' earlier results are kept)"
    )
    p.add_argument("--results-dir", type=Path, help="where realsize.json goes (default bench/results)")
    p.add_argument("--markdown", action="store_true", help="print the README table from realsize.json and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(((args.results_dir or RESULTS) / "realsize.json").read_text())))
        return 0
    if args.part:
        fn = {
            "peaks": part_peaks,
            "job": part_job,
            "timing": part_timing,
            "design-load": part_design_load,
            "design-run": part_design_run,
            "sigterm": part_sigterm,
        }[args.part]
        print(json.dumps(fn(args), default=str))
        return 0
    parts = set(args.only or PARTS) - ({"design"} if args.skip_design else set())
    results = previous_results(args.results_dir or RESULTS, parts)
    results["note"] = "timings taken on a shared 2-core machine with other work running"
    if "peaks" in parts:
        results["peaks"] = run_part("peaks", args)
    if parts & {"job", "timing", "sigterm"}:
        models(args.root, args.layers)  # built here once, not inside a measured part
    if "job" in parts:
        results["job"] = run_part("job", args)
    if "timing" in parts:
        results["timing"] = run_part("timing", args)
    if "sigterm" in parts:
        results["sigterm"] = run_part("sigterm", args)
    if "design" in parts:
        design_models(args.root)
        results["design"] = {
            "load": run_part("design-load", args),
            "run": run_part("design-run", args),
            "mac16": design_plans(),
            "claim": DESIGN_CLAIM,
        }
    print_report(results, args.results_dir)
    return 0


def print_report(results: dict[str, Any], results_dir: Path | None = None) -> None:
    rows: list[list[Any]] = []
    if "peaks" in results:
        pk = results["peaks"]
        c = pk["chunk_bytes"]
        for name in ("validation", "train_step"):
            r = pk[name]
            rows.append([f"V=151,936 {name} (chunks of {c / 1e6:.0f} MB)", "body", r["body"] / c, "", ""])
            rows.append(["", "body+head+loss", r["whole"] / c, "", round(r["seconds"], 1)])
    if "job" in results:
        job = results["job"]
        for phase, seconds, rate, peak, est in phase_rows(job):
            rows.append([f"job: {phase}", f"{seconds} s", f"peak {peak:.2f} GB", f"estimate {est:.2f} GB", rate])
        plan = next(e for e in job["events"] if e["event"] == "memory_plan")
        t = job["metrics"]["timing"]
        rows.append(["job: MLX peak", "", f"{t['peak_memory_bytes'] / GB:.2f} GB", f"{plan['total'] / GB:.2f} GB", ""])
        rows.append(["job: process peak RSS", "", f"{job['peak_rss'] / GB:.2f} GB", "", ""])
        rows.append(["job: adapter", "", f"{job['adapter_bytes'] / 1e6:.1f} MB", "", ""])
        rows.append(["job: bytes per target token", "", round(job["metrics"]["targets"]["bytes_per_token"], 1), "", ""])
    if "timing" in results:
        tm = results["timing"]
        for form in ("dequantized", "quantized"):
            rows.append([f"teacher 1.5B scoring, {form}", "", f"{tm[form]['rows_per_s']:.2f} rows/s", "", ""])
        rows.append(["teacher quantized slowdown", "", f"{tm['slowdown']:.1f}x", "", ""])
    if "design" in results:
        d = results["design"]
        for name in ("teacher", "student"):
            r = d["load"][name]
            rows.append(
                [
                    f"design {name} resident (CPU)",
                    "",
                    f"{r['active_bytes'] / GB:.2f} GB",
                    f"{r['estimate_cpu'] / GB:.2f}",
                    "",
                ]
            )
        kv, sc, dec = d["run"]["kv_cache"], d["run"]["score"], d["run"]["decode"]
        rows.append([f"design KV cache ({d['run']['layers']} blocks)", "", kv["measured"], kv["estimate"], ""])
        rows.append(["design scoring peak (2 blocks)", "", sc["peak_above_weights"], sc["estimate"], ""])
        rows.append(["design decode step (2 blocks, batch 8)", "", "", "", f"{dec['step_s']:.2f} s"])
        for name, plan in d["mac16"]["plans"].items():
            fits = "fits" if plan["fits_default_budget"] else "over budget"
            rows.append([f"Mac 16 GB plan: {name}", fits, "", f"{plan['total'] / GB:.2f} GB", ""])
    if "sigterm" in results:
        st = results["sigterm"]
        for phase, r in st["phases"].items():
            rows.append([f"SIGTERM -> exit: {phase}", f"exit {r['exit_code']}", f"{r['seconds']:.1f} s", "", ""])
    columns = ["what", "", "measured", "estimate", "time/rate"]
    report(
        "realsize",
        "Real sizes (issue 14)",
        columns,
        rows,
        results,
        **({"results_dir": results_dir} if results_dir else {}),
    )


def markdown(results: dict[str, Any]) -> str:
    """The README's Memory table (measured beside the plan's estimate) from realsize.json."""
    out = ["| what | measured | plan's estimate |", "|---|---|---|"]

    def row(what: str, measured: str, estimate: str = "") -> None:
        out.append(f"| {what} | {measured} | {estimate} |")

    if "peaks" in results:
        pk = results["peaks"]
        c = pk["chunk_bytes"]
        for name in ("validation", "train_step"):
            r = pk[name]
            row(
                f"V=151,936, {pk['rows']} rows: {name.replace('_', ' ')}, body / body + head + loss",
                f"{r['body'] / 1e6:.0f} / {r['whole'] / 1e6:.0f} MB ({(r['whole'] - r['body']) / c:.2f} chunks of "
                f"{c / 1e6:.0f} MB added)",
            )
    if "job" in results:
        job = results["job"]
        before = 0.0
        for phase, seconds, rate, peak, est in phase_rows(job):
            speed = f", {rate} tok/s" if rate and phase in ("generate", "score", "train") else ""
            # phase_finished carries the job's peak so far: a phase that did not raise it has its own below
            measured = f"{peak:.2f} GB" if peak > before else f"<= {peak:.2f} GB (peak so far)"
            row(
                f"job (0.5B student, 1.5B 4-bit teacher): {phase}, {seconds} s{speed}",
                measured,
                f"{est:.2f} GB" if est else "",
            )
            before = peak
        plan = next(e for e in job["events"] if e["event"] == "memory_plan")
        t = job["metrics"]["timing"]
        row("job: MLX peak", f"{t['peak_memory_bytes'] / GB:.2f} GB", f"{plan['total'] / GB:.2f} GB")
        row("job: process peak RSS", f"{job['peak_rss'] / GB:.2f} GB")
        row(
            "job: adapter, bytes per stored target token",
            f"{job['adapter_bytes'] / 1e6:.1f} MB, {job['metrics']['targets']['bytes_per_token']:.0f} B",
        )
    if "timing" in results:
        tm = results["timing"]
        row(
            "1.5B teacher scoring on the CPU: dequantized / 4-bit",
            f"{tm['dequantized']['rows_per_s']:.1f} / {tm['quantized']['rows_per_s']:.2f} rows/s "
            f"({tm['slowdown']:.0f}x slower quantized)",
        )
    if "design" in results:
        d = results["design"]
        for name in ("teacher", "student"):
            r = d["load"][name]
            row(
                f"7B + 3B: {name} resident ({'7B' if name == 'teacher' else '3B'} 4-bit; on this CPU scales are "
                f"float32, on a Mac as stored: {r['estimate_metal'] / GB:.2f} GB planned)",
                f"{r['active_bytes'] / GB:.2f} GB",
                f"{r['estimate_cpu'] / GB:.2f} GB",
            )
        kv = d["run"]["kv_cache"]
        row(
            f"7B KV cache, batch {kv['batch']}, {d['run']['layers']} blocks",
            f"{kv['measured'] / 1e6:.1f} MB",
            f"{kv['estimate'] / 1e6:.1f} MB",
        )
        dec = d["run"]["decode"]
        row(
            f"7B decode, batch {kv['batch']}, {d['run']['layers']} blocks + 4-bit head: above the weights, "
            f"{dec['step_s']:.0f} s a step on this CPU",
            f"{dec['peak_above_weights'] / 1e6:.1f} MB",
        )
        sc = d["run"]["score"]
        row(
            "7B scoring pass, 2 blocks, above the weights",
            f"{sc['peak_above_weights'] / 1e6:.0f} MB",
            f"{sc['estimate'] / 1e6:.0f} MB",
        )
        for name, plan in d["mac16"]["plans"].items():
            fits = "fits" if plan["fits_default_budget"] else "over"
            row(f"16 GB Mac, 7B + 3B 4-bit: {name}", "", f"{plan['total'] / GB:.2f} GB ({fits})")
    if "sigterm" in results:
        for phase, r in results["sigterm"]["phases"].items():
            row(f"SIGTERM to exit, `kd-worker run`: {phase}", f"{r['seconds']:.1f} s")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
