"""`kd-worker doctor` as a user runs it (its speed verdict is a timing: bench/blas.py measures it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import kd_env, venv_bin


def test_doctor_reports_platform_blas_redis_models_and_dirs(tmp_path, redis_url, models_root):
    env = kd_env(
        KD_REDIS_URL=redis_url,
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
        KD_ADAPTERS_DIR=str(tmp_path / "adapters_kd"),
        KD_WORK_DIR=str(tmp_path / "work"),
    )
    out = subprocess.run(
        [venv_bin("kd-worker"), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert {"platform", "mlx", "blas", "redis", "teacher", "student"} <= set(checks)
    assert checks["redis"]["status"] == checks["teacher"]["status"] == "ok"
    if sys.platform == "linux":
        assert checks["blas"]["status"] == "ok" and "openblas" in checks["blas"]["detail"].lower()
        assert "GFLOP/s" in checks["matmul fp32 1024²"]["detail"]
    assert checks["memory plan"]["status"] == "ok" and "budget" in checks["memory plan"]["detail"]
    assert "teacher compute" not in checks  # a float teacher: nothing to decide
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert out.returncode == (1 if failed else 0)


def test_doctor_prints_the_memory_plan_and_the_teachers_compute_form(tmp_path, redis_url, models_root):
    """A quantized teacher that fits dequantized is dequantized (the CPU backend); under a budget
    too small for it, it stays quantized (a warning with the measured slowdown) and the default job
    is refused, naming the setting to lower."""
    base = dict(
        KD_REDIS_URL=redis_url,
        KD_TEACHER=str(models_root / "teacher-4bit"),
        KD_STUDENT=str(models_root / "student"),
        KD_ADAPTERS_DIR=str(tmp_path / "adapters_kd"),
        KD_WORK_DIR=str(tmp_path / "work"),
    )

    def doctor(**extra: str) -> dict:
        out = subprocess.run(
            [venv_bin("kd-worker"), "doctor", "--json"], env=kd_env(**base, **extra), capture_output=True, text=True
        )
        return {c["name"]: c for c in json.loads(out.stdout)}

    roomy = doctor()
    assert roomy["memory plan"]["status"] == "ok"
    if sys.platform == "linux":
        assert roomy["teacher compute"]["status"] == "ok" and "dequantized" in roomy["teacher compute"]["detail"]
    tight = doctor(KD_MAX_JOB_MEMORY="120000000")
    assert tight["memory plan"]["status"] == "fail" and re.search(r"lower \w+ to \d+", tight["memory plan"]["detail"])
    if sys.platform == "linux":
        assert tight["teacher compute"]["status"] == "warn"
        assert re.search(r"measured \d+x slower than float32", tight["teacher compute"]["detail"])


def test_doctor_fails_on_a_broken_configuration(tmp_path, redis_url):
    env = kd_env(KD_REDIS_URL=redis_url, KD_TEACHER=str(tmp_path), KD_WORK_DIR=str(tmp_path / "work"))
    out = subprocess.run(
        [venv_bin("kd-worker"), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["teacher"]["status"] == "fail" and "no config.json" in checks["teacher"]["detail"]
    assert out.returncode == 1
