"""The memory plan (issue 14, part 2): each term against what MLX actually holds, the refusal
message, the budget's sources and the teacher's compute form (pure functions; fake backends)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache

from jobs.config import KDConfig
from jobs.errors import ResourceLimitExceeded
from kd_worker.engine import memory as M
from kd_worker.engine import objective as OBJ
from kd_worker.engine.data import SoftTargets, StudentSequence, collate
from kd_worker.engine.models import load_model_dir, resident_bytes
from kd_worker.engine.trainer import attach_lora, lora_layer_count, make_step
from kd_worker.fixtures.qwenvocab import qwen25_config, qwen25_shape
from kd_worker.fixtures.tinymodels import ALL_NAMES

GiB = 1 << 30


@pytest.mark.parametrize("name", ALL_NAMES)
def test_weights_estimate_is_exact_for_every_fixture(models_root, name):
    """Tied and untied, Qwen2 and Llama, 4- and 8-bit: the estimate from config.json equals the
    bytes the loaded model holds (float32 on the CPU backend, scales included)."""
    lm = load_model_dir(models_root / name)
    dims = M.read_dims(models_root / name)
    assert M.weight_bytes(dims, 4) == resident_bytes(lm.model)


@pytest.mark.parametrize("bits", [None, 4])
def test_weights_estimate_is_exact_for_a_qwen25_shape(bits):
    """The 0.5B shape (one block): bf16 as stored, and quantized the way mlx-lm's convert does."""
    cfg = qwen25_config(qwen25_shape("0.5B", 1), "bfloat16", bits=bits)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    assert M.weight_bytes(M.ModelDims.from_config(cfg), 2) == resident_bytes(model)


def test_dequantized_weights_estimate_is_exact(models_root):
    lm = load_model_dir(models_root / "teacher-4bit", dequantize=True)
    assert lm.dequantized
    dims = M.read_dims(models_root / "teacher-4bit")
    assert M.weight_bytes(dims, 4, dequantized=True) == resident_bytes(lm.model)
    assert M.weight_bytes(dims, 4, dequantized=True) == M.weight_bytes(M.read_dims(models_root / "teacher"), 4)


def test_lora_estimate_counts_parameters_gradients_and_both_adam_moments(models_root):
    lm = load_model_dir(models_root / "student")
    cfg = KDConfig(lora_layers=1, lora_rank=4)
    attach_lora(lm.model, cfg)
    params = sum(v.nbytes for _, v in tree_flatten(lm.model.trainable_parameters()))
    assert lora_layer_count(lm.model, cfg) == 1
    assert M.lora_bytes(M.read_dims(models_root / "student"), cfg) == 4 * params


@pytest.mark.parametrize(("batch", "tokens"), [(1, 5), (3, 300)])
def test_kv_cache_estimate_is_exact(models_root, batch, tokens):
    """mlx-lm's cache after a prefill of `tokens` positions for `batch` sequences (grown in 256-slot steps)."""
    lm = load_model_dir(models_root / "teacher")
    cache = make_prompt_cache(lm.model)
    mx.eval(lm.model(mx.zeros((batch, tokens), mx.int32), cache=cache))
    held = sum(c.nbytes for c in cache)
    assert M.kv_cache_bytes(M.read_dims(models_root / "teacher"), batch, tokens, 4) == held


def sequences(n: int, length: int, prompt: int, vocab: int, k: int = 8) -> list[StudentSequence]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        r = length - prompt
        ids = rng.integers(0, vocab, (r, k)).astype(np.int32)
        lp = (-np.sort(rng.exponential(2.0, (r, k)), axis=-1) - 1.0).astype(np.float32)
        tail = np.log1p(-np.exp(lp).sum(-1).clip(max=0.99)).astype(np.float32)
        t = SoftTargets(ids, lp, tail, np.full(r, 0.5, np.float32), np.ones(r, np.float32))
        out.append(StudentSequence(rng.integers(0, vocab, length).astype(np.int32), prompt, t))
    return out


def measured_peak(fn) -> int:
    mx.eval(fn())
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


@pytest.mark.parametrize(("batch", "width"), [(16, 256), (4, 512)])
def test_training_and_validation_estimates_are_within_25_percent_of_mlx(models_root, batch, width):
    """Sizes where activations, not the tiny head, decide: the plan's train and validate phases
    (LoRA state aside) against MLX's peak over one compiled training step and one validation batch."""
    lm = load_model_dir(models_root / "student")
    cfg = KDConfig(lora_layers=-1, batch_size=batch, max_seq_length=width)
    attach_lora(lm.model, cfg)
    dims = M.read_dims(models_root / "student")
    b = collate(sequences(batch, width + 1, 8, lm.n_tokens))
    obj = OBJ.Objective.from_config(cfg, lm.n_tokens)
    step, state = make_step(lm, obj, optim.Adam(learning_rate=1e-5))
    x, pos, t, uld = mx.array(b.inputs), mx.array(b.positions), tuple(OBJ.to_mx_targets(b)), OBJ.uld_rows(b)
    train = measured_peak(lambda: [state, step(x, pos, t, uld)])
    lm.model.eval()
    val = measured_peak(lambda: mx.array(obj.measure(lm, b)))
    plan = M.plan_job(dims, dims, cfg, M.JobShape(8), M.Precision(4, 4))
    est_train = plan.phase_total("train") - plan.phases["train"]["lora_adam"]
    est_val = plan.phase_total("validate") - plan.phases["validate"]["lora_adam"]
    print(f"train {train / 1e6:.1f} MB est {est_train / 1e6:.1f}; validate {val / 1e6:.1f} MB est {est_val / 1e6:.1f}")
    assert est_train == pytest.approx(train, rel=0.25)
    assert est_val == pytest.approx(val, rel=0.25)


# --- refusing a job ----------------------------------------------------------------------------
def fake_plan(cfg: KDConfig) -> M.MemoryPlan:
    """1 GB of weights; training grows with batch_size x max_seq_length, generation with gen_batch_size."""
    return M.MemoryPlan(
        600_000_000,
        400_000_000,
        {
            "train": {"activations": cfg.batch_size * cfg.max_seq_length * 1_000_000},
            "generate": {"kv_cache": cfg.gen_batch_size * 10_000_000},
        },
    )


def test_a_job_that_fits_is_planned_with_headroom_on_the_activations():
    plan = M.check_plan(fake_plan, KDConfig(batch_size=2, max_seq_length=512), 3_000_000_000, "KD_MAX_JOB_MEMORY=3")
    assert plan.total == 1_000_000_000 + 2 * 512 * 1_000_000 and plan.peak_phase == "train"
    assert plan.checked == 1_000_000_000 + int(2 * 512 * 1_000_000 * (1 + M.HEADROOM))
    assert plan.fits(plan.checked) and not plan.fits(plan.checked - 1)
    assert not plan.fits(plan.total)  # the estimate alone is not room enough: activations get headroom
    assert plan.checked - plan.total < 2 * 512 * 1_000_000 * 0.25  # ...a bounded one


def test_a_job_that_cannot_fit_names_the_setting_and_the_largest_value_that_fits():
    cfg = KDConfig(batch_size=8, max_seq_length=512)
    with pytest.raises(ResourceLimitExceeded) as e:
        M.check_plan(fake_plan, cfg, 3_000_000_000, "KD_MAX_JOB_MEMORY=3,000,000,000")
    msg = str(e.value)
    assert "lower batch_size to 3 (--set batch_size=3)" in msg  # 1 GB + 3 x 512 MB x 1.15 fits, 4 x ... does not
    assert "KD_MAX_JOB_MEMORY=3,000,000,000" in msg and "train" in msg
    assert M.check_plan(fake_plan, cfg.model_copy(update={"batch_size": 3}), 3_000_000_000, "").checked <= 3e9


def test_the_next_setting_is_named_when_the_first_cannot_help():
    cfg = KDConfig(batch_size=1, max_seq_length=4096)
    with pytest.raises(ResourceLimitExceeded, match=r"lower max_seq_length to 1739 \(--set max_seq_length=1739\)"):
        M.check_plan(fake_plan, cfg, 3_000_000_000, "")


def test_models_that_alone_do_not_fit_are_said_to():
    with pytest.raises(ResourceLimitExceeded, match="weights alone take 1.00 GB"):
        M.check_plan(fake_plan, KDConfig(batch_size=1, max_seq_length=16), 900_000_000, "")


def test_a_phase_no_setting_can_shrink_is_said_to():
    def plan(cfg: KDConfig) -> M.MemoryPlan:
        return M.MemoryPlan(100, 100, {"score": {"activations": 1000}, "train": {"a": cfg.batch_size}})

    with pytest.raises(ResourceLimitExceeded) as e:
        M.check_plan(plan, KDConfig(batch_size=8), 1000, "")
    assert "no one of max_seq_length, gen_batch_size, gen_max_tokens, batch_size brings it under" in str(e.value)


# --- the budget --------------------------------------------------------------------------------
def test_budget_on_metal_is_the_recommended_working_set_less_a_margin_and_is_enforced():
    info = {"max_recommended_working_set_size": 11_453_251_584, "memory_size": 17_179_869_184}
    backend = M.Backend(metal=True, device_info=info, ram=17_179_869_184)
    budget = M.job_budget(None, backend)
    assert budget.bytes == int(11_453_251_584 * (1 - M.METAL_MARGIN))
    assert "recommended working set 11.45 GB" in budget.source and "KD_MAX_JOB_MEMORY" in budget.source
    limits: list[int] = []
    budget.enforce(backend, set_limit=lambda n: limits.append(n) or 0)
    assert limits == [budget.bytes]


def test_budget_override_and_cpu_default_never_touch_the_metal_limit():
    cpu = M.Backend(metal=False, device_info={}, ram=24 * GiB)
    limits: list[int] = []
    for budget in (M.job_budget(None, cpu), M.job_budget(5 * GiB, cpu)):
        budget.enforce(cpu, set_limit=lambda n: limits.append(n) or 0)
    assert limits == []
    assert M.job_budget(None, cpu).bytes == int(24 * GiB * (1 - M.CPU_MARGIN))
    metal = M.Backend(metal=True, device_info={"max_recommended_working_set_size": 10 * GiB}, ram=16 * GiB)
    assert M.job_budget(5 * GiB, metal) == M.Budget(5 * GiB, f"KD_MAX_JOB_MEMORY={5 * GiB:,}")


def test_detected_backend_on_this_machine():
    backend = M.Backend.detect()
    assert backend.metal == mx.metal.is_available() and backend.ram > 0


# --- the teacher's compute form ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("metal", "bits", "budget", "expected"),
    [
        (False, 4, 100 * GiB, True),  # CPU, quantized, fits dequantized: float32
        (False, 4, 1 * GiB, False),  # does not fit dequantized: stays quantized
        (True, 4, 100 * GiB, False),  # Metal: quantized is the fast path
        (False, None, 100 * GiB, False),  # nothing to dequantize
    ],
)
def test_a_quantized_teacher_is_dequantized_on_the_cpu_when_it_fits(metal, bits, budget, expected):
    cfg = qwen25_config("1.5B", "bfloat16", bits=bits)
    teacher = M.ModelDims.from_config(cfg)
    student = M.ModelDims.from_config(qwen25_config("0.5B", "bfloat16"))
    backend = M.Backend(metal=metal, device_info={"max_recommended_working_set_size": budget}, ram=budget)
    form = M.teacher_form(teacher, student, KDConfig(), M.Budget(budget, ""), backend, "auto")
    assert form.dequantize is expected
    assert form.precision.teacher == (4 if not metal else 2)
    plan = form.plan(teacher, student, KDConfig())
    if bits:  # the plan holds the teacher as the decision says
        assert (plan.teacher == M.weight_bytes(teacher, 4, dequantized=True)) is expected


def test_read_dims_names_a_broken_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(Exception, match="config.json: cannot read the model's dimensions"):
        M.read_dims(tmp_path)
