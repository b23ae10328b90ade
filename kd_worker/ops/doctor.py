"""`kd-worker doctor`: is this machine ready to distil? Prints a table; non-zero exit on a problem."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kd_worker.ops.blas import BlasInfo, mapped_blas
from kd_worker.settings import WorkerSettings


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


def matmul_gflops(n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(MLX, numpy) fp32 GFLOP/s for an n x n matmul, best of `repeats`."""
    import mlx.core as mx
    import numpy as np

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = min(_timed(lambda: mx.eval(a @ b)) for _ in range(repeats))
    an, bn = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    an @ bn
    best_np = min(_timed(lambda: an @ bn) for _ in range(repeats))
    flops = 2 * n**3 / 1e9
    return flops / best, flops / best_np


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _dir_writable(path: Path) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".doctor-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        return Check(str(path), "ok", "writable")
    except OSError as e:
        return Check(str(path), "fail", f"not writable: {e.strerror}")


def _model_check(label: str, var: str, path: Path | None) -> Check:
    if path is None:
        return Check(label, "warn", f"{var} not set (needed by `kd-worker run`; the demo builds its own)")
    if not (path / "config.json").is_file():
        return Check(label, "fail", f"{var}={path}: no config.json there")
    if not list(path.glob("*.safetensors")):
        return Check(label, "fail", f"{var}={path}: no *.safetensors weights")
    return Check(label, "ok", str(path))


def _redis_check(url: str) -> Check:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return Check("redis", "ok", f"{url} reachable")
    except redis.RedisError as e:
        return Check("redis", "warn", f"{url} unreachable ({e}); start Redis or set KD_REDIS_URL (see README)")


def memory_checks(settings: WorkerSettings) -> list[Check]:
    """The memory plan of a job with the worker's default settings on the configured teacher and
    student, against the budget; and, for a quantized teacher, the form it computes in."""
    from jobs.config import resolve_config
    from jobs.errors import KDError, ResourceLimitExceeded
    from kd_worker.engine import memory as M
    from kd_worker.engine.models import quantized_slowdown

    if settings.teacher is None or settings.student is None:
        return []
    try:
        cfg = resolve_config(settings.kd_defaults)
        t, s = M.read_dims(settings.teacher), M.read_dims(settings.student)
    except KDError as e:
        return [Check("memory plan", "fail", str(e))]
    backend = M.Backend.detect()
    budget = M.job_budget(settings.max_job_memory, backend)
    form = M.teacher_form(t, s, cfg, budget, backend, settings.compute_dtype)
    try:
        plan = M.check_plan(lambda c: form.plan(t, s, c), cfg, budget.bytes, budget.source)
    except ResourceLimitExceeded as e:
        checks = [Check("memory plan", "fail", f"a job with the default settings would be refused: {e}")]
    else:
        parts = ", ".join(f"{k} {M.human(v)}" for k, v in plan.phases[plan.peak_phase].items())
        held = " (dequantized)" if form.dequantize else ""
        detail = (
            f"{M.human(plan.total)} of a {M.human(budget.bytes)} budget ({budget.source}): teacher "
            f"{M.human(plan.teacher)}{held} + student {M.human(plan.student)}"
            f" + {plan.peak_phase} ({parts}) at batch_size={cfg.batch_size}, max_seq_length={cfg.max_seq_length}, "
            f"gen_batch_size={cfg.gen_batch_size}, gen_max_tokens={cfg.gen_max_tokens}"
        )
        checks = [Check("memory plan", "ok", detail)]
    if t.bits is not None and backend.metal:
        checks.append(Check("teacher compute", "ok", f"{t.bits}-bit on Metal (quantized matmuls are its fast path)"))
    elif t.bits is not None:
        slowdown = quantized_slowdown(t.hidden, t.intermediate, t.bits, t.group_size)
        if form.dequantize:
            detail = f"dequantized to float32 at load: its {t.bits}-bit matmuls measured {slowdown:.0f}x slower here"
            checks.append(Check("teacher compute", "ok", detail))
        else:
            why = (
                f"KD_COMPUTE_DTYPE={settings.compute_dtype}"
                if settings.compute_dtype not in ("auto", "float32")
                else "float32 would not fit the memory budget"
            )
            detail = (
                f"kept {t.bits}-bit ({why}): its matmuls measured {slowdown:.0f}x slower than float32 here; "
                "expect a slow teacher phase"
            )
            checks.append(Check("teacher compute", "warn", detail))
    return checks


def run_checks(settings: WorkerSettings, blas: BlasInfo) -> list[Check]:
    import mlx.core as mx

    checks = [
        Check("platform", "ok", f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}"),
        Check("mlx", "ok", f"{importlib.metadata.version('mlx')}, default device {mx.default_device()}"),
    ]
    if sys.platform == "linux":
        library = mapped_blas(Path("/proc/self/maps").read_text())
        status = "ok" if library and "openblas" in library.lower() else "fail"
        checks.append(Check("blas", status, f"{library or 'unknown'} (OPENBLAS_CORETYPE={blas.coretype}); {blas.note}"))
        gf, gf_np = matmul_gflops()
        ratio = gf_np / gf
        checks.append(
            Check(
                "matmul fp32 1024²",
                "ok" if ratio <= 2.0 else "fail",
                f"MLX {gf:.0f} GFLOP/s vs numpy {gf_np:.0f} GFLOP/s ({ratio:.2f}x slower; target <= 2x)",
            )
        )
    else:
        checks.append(Check("blas", "ok", blas.note))
    checks.append(_redis_check(settings.redis_url))
    checks.append(_model_check("teacher", "KD_TEACHER", settings.teacher))
    checks.append(_model_check("student", "KD_STUDENT", settings.student))
    if checks[-1].status == checks[-2].status == "ok":
        checks.extend(memory_checks(settings))
    checks.append(_dir_writable(settings.adapters_dir))
    checks.append(_dir_writable(settings.work_dir))
    return checks
