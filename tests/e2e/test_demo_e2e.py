"""The README's first command in a reduced form: `kd-worker demo` on a fresh directory. Slow: a fresh
directory trains the demo's teacher and student base first (about a minute on two idle cores)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import kd_env, venv_bin


@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path):
    env = kd_env(KD_ADAPTERS_DIR=str(tmp_path / "adapters_kd"))
    out = subprocess.run(
        [venv_bin("kd-worker"), "demo", "--dir", str(tmp_path / "demo"), "--iterations", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "published digits v1" in out.stdout and "KL(teacher||student)" in out.stdout
    assert "student now agrees with the teacher on" in out.stdout and "kd-client dashboard" in out.stdout
    summary = json.loads((tmp_path / "adapters_kd" / "kd_summary.json").read_text())
    assert summary["domains"]["digits"]["version"] == 1
    assert (tmp_path / "demo" / "loss_digits.png").stat().st_size > 1000
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # redis-server and the worker were stopped
