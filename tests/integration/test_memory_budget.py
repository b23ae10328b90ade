"""The memory plan and budget around a real job (issue 14, part 2): a job that cannot fit is refused
before the student loads, naming the setting and the value that fits, and that value then runs
inside the budget (MLX's measured peak included); a quantized teacher is dequantized on the CPU
only when it fits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.nn as nn
import pytest
from helpers import FAST, distill, engine_settings
from structlog.testing import capture_logs

from jobs.errors import ResourceLimitExceeded
from kd_worker.daemon import continual
from kd_worker.daemon.runtime import Runtime

BUDGET = 150_000_000  # bytes: 64 prompts fit in batches of a few, not in one batch of 64


def write_prompts(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"q {i}: tell me about item {i * 7} and why"}) + "\n" for i in range(n))
    )
    return path


def test_a_job_that_cannot_fit_is_refused_before_the_student_loads_and_the_named_value_fits(tmp_path, models_root):
    settings = engine_settings(tmp_path, max_job_memory=BUDGET)
    runtime = Runtime(settings)
    big = {**FAST, "batch_size": 64, "gen_max_tokens": 96}
    data = (("prompts", write_prompts(tmp_path / "many.jsonl", 64)),)
    with pytest.raises(ResourceLimitExceeded) as e:
        distill(tmp_path, models_root, data=data, overrides=big, settings=settings, runtime=runtime)
    msg = str(e.value)
    assert "KD_MAX_JOB_MEMORY=150,000,000" in msg and "train" in msg, msg
    found = re.search(r"lower (\w+) to (\d+) \(--set \1=\2\)", msg)
    assert found, msg
    knob, value = found.groups()
    assert knob == "batch_size" and 1 <= int(value) < 64
    assert runtime._student is None  # refused before the student was loaded
    # and before any work: the run holds only its frozen replay plan (daemon.continual, made first)
    # beside the model identity cache of the teacher's load; no teacher output, no checkpoint
    work = tmp_path / "work"
    assert sorted(p.name for p in work.rglob("*") if p.is_file()) == [continual.FROZEN, "identity.json"]
    # the value the error names runs within the budget: MLX's own peak never passed it (MemoryBudget)
    out = distill(
        tmp_path, models_root, data=data, overrides={**big, knob: int(value)}, settings=settings, runtime=runtime
    )
    assert out["published"]


def quantized_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())


def test_a_quantized_teacher_is_dequantized_on_the_cpu_when_it_fits(tmp_path, models_root):
    runtime = Runtime(engine_settings(tmp_path))  # the default budget: this machine's RAM less a margin
    with capture_logs() as logs:
        lm = runtime.teacher(models_root / "teacher-4bit", models_root / "student")
    assert lm.dequantized and quantized_layers(lm.model) == 0
    assert any(e["event"] == "teacher_dequantized" for e in logs)


def test_a_quantized_teacher_that_would_not_fit_dequantized_stays_quantized_with_a_warning(tmp_path, models_root):
    runtime = Runtime(engine_settings(tmp_path, max_job_memory=30_000_000))
    with capture_logs() as logs:
        lm = runtime.teacher(models_root / "teacher-4bit", models_root / "student")
    assert not lm.dequantized and quantized_layers(lm.model) > 0
    (warning,) = [e for e in logs if e["event"] == "teacher_kept_quantized"]
    assert warning["log_level"] == "warning" and warning["slowdown_measured"] > 1.0
    assert "slower than float32" in warning["note"]
