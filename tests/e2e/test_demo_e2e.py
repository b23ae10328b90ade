"""The README's first command: `kd-worker demo` on a fresh directory, with the demo's own job
settings. Slow: a fresh directory trains the demo's teacher and student base first (about a
minute on two idle cores), then the job runs its 150 steps."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import kd_env, venv_bin

from jobs import publisher

# What the demo promises (issue 21): held-out KL and exact match move by a large factor. Measured
# 16x and 0% -> 100%; the recipe that collapsed to one answer (learning_rate 1e-3) gave 4.7x and 10%.
MIN_KL_FACTOR = 8.0
MIN_EXACT_AFTER = 50


@pytest.mark.slow
def test_demo_runs_end_to_end_teaches_the_task_and_cleans_up(tmp_path):
    env = kd_env(KD_ADAPTERS_DIR=str(tmp_path / "adapters_kd"))
    out = subprocess.run(
        [venv_bin("kd-worker"), "demo", "--dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "published digits v1" in out.stdout and "KL(teacher||student)" in out.stdout
    assert "student now agrees with the teacher on" in out.stdout and "kd-client dashboard" in out.stdout
    summary = json.loads((tmp_path / "adapters_kd" / "kd_summary.json").read_text())
    assert summary["domains"]["digits"]["version"] == 1
    assert (tmp_path / "demo" / "loss_digits.png").stat().st_size > 1000
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""  # redis-server and the worker were stopped

    version = publisher.resolve(tmp_path / "adapters_kd", "digits")
    assert version is not None
    kl = json.loads((version.path / publisher.METRICS).read_text())
    assert kl["before"]["kl"] >= MIN_KL_FACTOR * kl["after"]["kl"], (kl["before"], kl["after"])
    exact = re.search(r"exact match (\d+)% -> (\d+)%", out.stdout)
    assert exact is not None, out.stdout[-3000:]
    assert int(exact[2]) >= MIN_EXACT_AFTER > int(exact[1]), exact[0]
