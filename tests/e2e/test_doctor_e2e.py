"""`kd-worker doctor` as a user runs it (its speed verdict is a timing: bench/blas.py measures it)."""

from __future__ import annotations

import json
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
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert out.returncode == (1 if failed else 0)


def test_doctor_fails_on_a_broken_configuration(tmp_path, redis_url):
    env = kd_env(KD_REDIS_URL=redis_url, KD_TEACHER=str(tmp_path), KD_WORK_DIR=str(tmp_path / "work"))
    out = subprocess.run(
        [venv_bin("kd-worker"), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["teacher"]["status"] == "fail" and "no config.json" in checks["teacher"]["detail"]
    assert out.returncode == 1
