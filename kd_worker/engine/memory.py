"""Memory: a job's plan, checked before it starts, the budget it must fit, and the budget as a stop
reason while it runs.

On a Mac, running out of Metal memory aborts the process (SIGABRT), so a job that cannot fit is
refused before any of it runs. The plan is pure arithmetic over the models' configs and the job's
KDConfig; nothing is loaded to make it:

    peak = teacher weights + student weights + max over the job's phases of
        generate   KV cache of gen_batch_size x (prompt + gen_max_tokens) + one prefill layer
        score      one teacher layer over a scoring batch + the head's chunks
        train      LoRA parameters, gradients and Adam state + the activations autodiff keeps for
                   batch_size x max_seq_length + the head's chunks (objective.py)
        validate   LoRA state + one student layer + the head's chunks

Each term counts what MLX materialises (mlx-lm's qwen2/llama blocks, MLX's own attention fallback,
which builds the [B, H, L, L] scores on the CPU); tests compare each against MLX's peak counter on
small shapes and bench/realsize.py the whole against a real-shape job.

The budget: KD_MAX_JOB_MEMORY when set; else on Metal the device's recommended working set less a
margin (enforced with mx.set_memory_limit), on the CPU backend the machine's RAM less a margin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx

from jobs.config import KDConfig
from jobs.errors import ModelError, ResourceLimitExceeded
from kd_worker.engine.hooks import Hooks, Stop
from kd_worker.engine.models import read_config
from kd_worker.engine.objective import chunk_rows
from kd_worker.engine.teacher import SCORE_CHUNK, SCORE_TOKENS_PER_BATCH

GB = 1e9
KV_STEP = 256  # mlx-lm's KV caches grow in steps of 256 positions
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # mlx-lm's default: all
METAL_MARGIN = 0.05  # of the recommended working set: Python, tokenizers, numpy buffers
CPU_MARGIN = 0.20  # of RAM: the OS, Redis, numpy buffers (scoring post-processes in numpy)
FUSED_LIVE = 4  # [rows, V] arrays of one fused training pass (logits, exp, tempered exp, gradient)
HEADROOM = 0.15  # on a phase's estimated bytes when checking them against a budget


@dataclass(frozen=True)
class ModelDims:
    """What memory depends on in a decoder-only config.json (Qwen2/Llama/Mistral layout)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rows: int  # embedding rows (vocab_size)
    tied: bool
    attn_bias: bool
    bits: int | None  # quantized weights (mlx-lm's "quantization" block), else None
    group_size: int
    dtype_bytes: int  # the checkpoint's float dtype

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelDims:
        heads = int(cfg["num_attention_heads"])
        q = cfg.get("quantization") or {}
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate=int(cfg["intermediate_size"]),
            rows=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", True)),  # mlx-lm's default for qwen2 and llama
            attn_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
            bits=int(q["bits"]) if q.get("bits") else None,
            group_size=int(q.get("group_size", 64)),
            dtype_bytes=2 if str(cfg.get("torch_dtype", "bfloat16")) in ("bfloat16", "float16") else 4,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one block, by mlx-lm's names."""
        d, i = self.hidden, self.intermediate
        return {
            "q_proj": (self.q_dim, d),
            "k_proj": (self.kv_dim, d),
            "v_proj": (self.kv_dim, d),
            "o_proj": (d, self.q_dim),
            "gate_proj": (i, d),
            "up_proj": (i, d),
            "down_proj": (d, i),
        }


def human(n: float) -> str:
    """Bytes for people: "812 MB", "4.31 GB"."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def read_dims(model_dir: Path) -> ModelDims:
    """ModelDims of a model directory's config.json (nothing else is read)."""
    config = read_config(model_dir)
    try:
        return ModelDims.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model_dir}/config.json: cannot read the model's dimensions: {e}") from e


def matrix_bytes(d: ModelDims, out: int, inn: int, float_bytes: int, quantized: bool) -> int:
    """A weight matrix as held in memory: packed bits + a scale and a bias per group, or floats."""
    if quantized and d.bits is not None and inn % d.group_size == 0:
        return out * inn * d.bits // 8 + 2 * out * (inn // d.group_size) * float_bytes
    return out * inn * float_bytes


def weight_bytes(d: ModelDims, float_bytes: int, dequantized: bool = False) -> int:
    """Resident weights: quantized matrices stay packed (unless dequantized); every float tensor
    (norms, biases, scales) in the compute dtype (`set_dtype` casts them all)."""
    q = not dequantized

    def mat(out: int, inn: int) -> int:
        return matrix_bytes(d, out, inn, float_bytes, q)

    block = sum(mat(o, i) for o, i in d.linears().values()) + 2 * d.hidden * float_bytes
    if d.attn_bias:
        block += (d.q_dim + 2 * d.kv_dim) * float_bytes
    head = 0 if d.tied else mat(d.rows, d.hidden)
    return mat(d.rows, d.hidden) + d.layers * block + d.hidden * float_bytes + head


def lora_layers(d: ModelDims, cfg: KDConfig) -> int:
    return d.layers if cfg.lora_layers == -1 else min(cfg.lora_layers, d.layers)


def lora_bytes(d: ModelDims, cfg: KDConfig) -> int:
    """LoRA A and B (float32) with their gradients and Adam's two moments: 4 copies."""
    keys = [k.rsplit(".", 1)[-1] for k in cfg.lora_keys] if cfg.lora_keys is not None else LORA_KEYS
    per_layer = sum(cfg.lora_rank * (o + i) for k, (o, i) in d.linears().items() if k in keys)
    return 4 * 4 * per_layer * lora_layers(d, cfg)


def kv_cache_bytes(d: ModelDims, batch: int, tokens: int, act_bytes: int) -> int:
    """Keys and values of every layer for `batch` sequences of `tokens` (grown in KV_STEP slots)."""
    slots = -(-tokens // KV_STEP) * KV_STEP
    return 2 * d.layers * batch * slots * d.kv_dim * act_bytes


def attention_bytes(d: ModelDims, batch: int, width: int, act_bytes: int) -> int:
    """One layer's attention scores [B, H, L, L] (MLX's attention on the CPU materialises them)."""
    return batch * d.heads * width * width * act_bytes


# Arrays of each width MLX holds, per token (and scores per layer), fitted by least squares to MLX's
# peak counter (MLX 0.32, CPU backend, mlx-lm's qwen2 block) over hidden, intermediate, KV and
# head sizes and batch shapes; each fit is within 3% of its measurements. Autodiff keeps more
# than a hand count of the block's saved tensors (the LoRA branches, SwiGLU's sigmoid, the
# compiled step's copies); a forward without a gradient has ~2 layers in flight (the stream runs
# ahead of Python), hence its many [T, D] arrays.
FORWARD_WIDTHS = (13.0, 2.0, 3.0, 1.0)  # (hidden, intermediate, kv, attention scores)
SAVED_WIDTHS = (9.0, 5.0, 1.5, 1.2)


def _widths(d: ModelDims, batch: int, width: int, act_bytes: int, w: tuple[float, float, float, float]) -> int:
    t = batch * width
    per_token = w[0] * d.hidden + w[1] * d.intermediate + w[2] * d.kv_dim
    return int((t * per_token + w[3] * d.heads * batch * width * width) * act_bytes)


def layer_bytes(d: ModelDims, batch: int, width: int, act_bytes: int) -> int:
    """Peak of the blocks' forward without a gradient (or the backward's transients), over the
    arrays kept anyway: the residual stream, the MLP's [T, I] arrays and the attention scores."""
    return _widths(d, batch, width, act_bytes, FORWARD_WIDTHS)


def saved_bytes(d: ModelDims, batch: int, width: int, act_bytes: int) -> int:
    """What autodiff keeps per trained block for the backward (block input, norms, q/k/v, the
    attention probabilities, the LoRA branches' inputs, gate/up/SwiGLU outputs...)."""
    return _widths(d, batch, width, act_bytes, SAVED_WIDTHS)


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate of a job: resident weights and each phase's extra bytes, by part."""

    teacher: int
    student: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def total(self) -> int:
        return self.teacher + self.student + self.phase_total(self.peak_phase)

    @property
    def checked(self) -> int:
        """What the budget is checked against: the total with HEADROOM on the per-phase part
        (the weights are exact; the activations are estimates, within ~10% in tests)."""
        return self.teacher + self.student + int(self.phase_total(self.peak_phase) * (1 + HEADROOM))

    def fits(self, budget: int) -> bool:
        return self.checked <= budget

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "checked": self.checked,
            "teacher": self.teacher,
            "student": self.student,
            "peak_phase": self.peak_phase,
            "phases": {p: {**parts, "total": sum(parts.values())} for p, parts in self.phases.items()},
        }


@dataclass(frozen=True)
class Precision:
    """Bytes per float of each model's weights (after `set_dtype`) and activations."""

    teacher: int
    student: int

    @classmethod
    def for_backend(cls, teacher: ModelDims, student: ModelDims, compute_dtype: str, cpu: bool) -> Precision:
        """models.compute_dtype: float32 on the CPU backend ("auto"), the checkpoint's on Metal."""
        if compute_dtype != "auto":
            b = 4 if compute_dtype == "float32" else 2
            return cls(b, b)
        return cls(4, 4) if cpu else cls(teacher.dtype_bytes, student.dtype_bytes)


@dataclass(frozen=True)
class JobShape:
    """What the plan needs of a job's data, in teacher tokens: its longest prompt, its longest
    prompt + response (None: up to max_seq_length) and how many examples (None: unbounded)."""

    prompt_tokens: int
    seq_tokens: int | None = None
    examples: int | None = None

    @classmethod
    def worst(cls, cfg: KDConfig) -> JobShape:
        """The largest job `cfg` allows, for plans made before any data is known."""
        return cls(max(1, cfg.max_seq_length - cfg.gen_max_tokens))


def plan_job(
    teacher: ModelDims,
    student: ModelDims,
    cfg: KDConfig,
    shape: JobShape,
    precision: Precision,
    teacher_resident: int | None = None,
    teacher_dequantized: bool = False,
) -> MemoryPlan:
    """The memory a job will reach. `teacher_resident`: the resident teacher's actual bytes when
    it is loaded already (then its dtype and any dequantization are what they are). Validation
    and scoring evaluate the body before the head's first chunk, so there the larger of the two
    counts, not their sum."""
    tb, sb = precision.teacher, precision.student
    longest = min(cfg.max_seq_length, shape.seq_tokens or cfg.max_seq_length)
    width = -(-longest // 8) * 8  # collate pads to a multiple of 8
    n = shape.examples or 1 << 30
    gen_batch, batch = min(cfg.gen_batch_size, n), min(cfg.batch_size, n)
    # scoring batches fill SCORE_TOKENS_PER_BATCH tokens (and one sequence more), padded to the longest
    score_batch = max(1, min(n * width, SCORE_TOKENS_PER_BATCH + width) // width)
    rows, chunk = batch * width, chunk_rows(student.rows)  # response rows are fewer: a bound
    # validation holds a chunk's logits and their tempered copy; a training pass ~FUSED_LIVE arrays
    # of its rows, and the compiled step about two chunks whatever the rows (objective.FUSED_PARTS)
    head_val = 2 * min(rows, chunk) * student.rows * 4
    head_train = min(FUSED_LIVE * rows, 2 * chunk) * student.rows * 4
    lora = lora_bytes(student, cfg)
    phases = {
        "generate": {
            "kv_cache": kv_cache_bytes(teacher, gen_batch, min(longest, shape.prompt_tokens + cfg.gen_max_tokens), tb),
            "prefill": layer_bytes(teacher, gen_batch, shape.prompt_tokens, tb),
        },
        "score": {
            "hidden": score_batch * width * teacher.hidden * tb,
            "body_or_head": max(
                layer_bytes(teacher, score_batch, width, tb),
                2 * min(SCORE_CHUNK, score_batch * width) * teacher.rows * 4,
            ),
        },
        "train": {
            "lora_adam": lora,
            "activations": lora_layers(student, cfg) * saved_bytes(student, batch, width, sb),
            "head_or_backward": max(head_train, layer_bytes(student, batch, width, sb)),
        },
        "validate": {
            "lora_adam": lora,
            "body_or_head": max(layer_bytes(student, batch, width, sb), head_val),
        },
    }
    t_weights = teacher_resident if teacher_resident is not None else weight_bytes(teacher, tb, teacher_dequantized)
    return MemoryPlan(t_weights, weight_bytes(student, sb), phases)


# Settings that shrink each phase, in the order a person would lower them, with their floor.
KNOBS: dict[str, tuple[tuple[str, int], ...]] = {
    "generate": (("gen_batch_size", 1), ("gen_max_tokens", 1)),
    "score": (("max_seq_length", 16),),
    "train": (("batch_size", 1), ("max_seq_length", 16)),
    "validate": (("batch_size", 1), ("max_seq_length", 16)),
}


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest v in [low, high] with fits(v) (fits is monotone: smaller always fits better)."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _fits(plan_for: Callable[[KDConfig], MemoryPlan], cfg: KDConfig, knob: str, budget: int, value: int) -> bool:
    return plan_for(cfg.model_copy(update={knob: value})).fits(budget)


def check_plan(plan_for: Callable[[KDConfig], MemoryPlan], cfg: KDConfig, budget: int, source: str) -> MemoryPlan:
    """The job's plan if it fits `budget`; else ResourceLimitExceeded naming the setting to lower
    and the largest value that fits (or saying that the models alone do not fit)."""
    plan = plan_for(cfg)
    if plan.fits(budget):
        return plan
    phase = plan.peak_phase
    parts = ", ".join(f"{k} {human(v)}" for k, v in plan.phases[phase].items())
    head = (
        f"the job needs an estimated {human(plan.total)} of memory ({human(plan.checked)} with {HEADROOM:.0%} "
        f"headroom on {phase}), over the budget of {human(budget)} "
        f"({source}): teacher {human(plan.teacher)} + student {human(plan.student)} + {phase} ({parts})"
    )
    knobs = list(dict.fromkeys([*KNOBS[phase], *(k for p in KNOBS.values() for k in p)]))
    for knob, floor in knobs:  # the peak phase's settings first, then the others', one at a time
        current = getattr(cfg, knob)
        best = largest_fitting(partial(_fits, plan_for, cfg, knob, budget), floor, current - 1)
        if best is not None:
            raise ResourceLimitExceeded(f"{head}; lower {knob} to {best} (--set {knob}={best}) or raise the budget")
    weights = plan.teacher + plan.student
    if weights > budget:
        raise ResourceLimitExceeded(
            f"{head}; the teacher and student weights alone take {human(weights)}: use a smaller or quantized "
            "teacher or student, or raise the budget"
        )
    smallest = plan_for(cfg.model_copy(update={k: floor for k, floor in knobs}))
    raise ResourceLimitExceeded(
        f"{head}; no one of {', '.join(dict(knobs))} brings it under the budget (with all at their minimum it "
        f"needs {human(smallest.total)}, {smallest.peak_phase} the largest phase): raise the budget"
    )


# --- the budget ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """What the budget depends on; `detect()` reads it, tests build it by hand."""

    metal: bool
    device_info: dict[str, Any]
    ram: int

    @classmethod
    def detect(cls) -> Backend:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        metal = mx.metal.is_available()
        return cls(metal, dict(mx.device_info()) if metal else {}, ram)


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # said in errors and logs: where the number comes from and how to change it

    def enforce(self, backend: Backend, set_limit: Callable[[int], int] = mx.set_memory_limit) -> None:
        """On Metal, MLX's memory limit (allocations past it wait for running work, then fail as an
        exception instead of the GPU aborting the process). The CPU backend has no such limit."""
        if backend.metal:
            set_limit(self.bytes)


def job_budget(override: int | None, backend: Backend) -> Budget:
    """KD_MAX_JOB_MEMORY, else the device's recommended working set (Metal) or RAM (CPU) less a margin."""
    if override is not None:
        return Budget(override, f"KD_MAX_JOB_MEMORY={override:,}")
    if backend.metal:
        working_set = int(backend.device_info["max_recommended_working_set_size"])
        return Budget(
            int(working_set * (1 - METAL_MARGIN)),
            f"Metal's recommended working set {human(working_set)} less {METAL_MARGIN:.0%}; "
            "KD_MAX_JOB_MEMORY overrides it",
        )
    return Budget(
        int(backend.ram * (1 - CPU_MARGIN)),
        f"RAM {human(backend.ram)} less {CPU_MARGIN:.0%}; KD_MAX_JOB_MEMORY overrides it",
    )


@dataclass(frozen=True)
class TeacherForm:
    """How the teacher is held: dequantized to float32 or as stored, and the bytes per float."""

    dequantize: bool
    precision: Precision

    def plan(self, teacher: ModelDims, student: ModelDims, cfg: KDConfig, shape: JobShape | None = None) -> MemoryPlan:
        """The plan of a job of `cfg` (of `shape`, else the largest `cfg` allows) with the teacher held so."""
        shape = shape or JobShape.worst(cfg)
        return plan_job(teacher, student, cfg, shape, self.precision, teacher_dequantized=self.dequantize)


def teacher_form(
    teacher: ModelDims, student: ModelDims, cfg: KDConfig, budget: Budget, backend: Backend, compute_dtype: str
) -> TeacherForm:
    """Dequantize a quantized teacher to float32 on the CPU backend (its quantized matmuls are an
    order of magnitude slower there) when the largest job `cfg` allows still fits the budget with
    it dequantized. Never on Metal (quantized is its fast path), nor for a
    float teacher, nor when KD_COMPUTE_DTYPE asks for half precision."""
    precision = Precision.for_backend(teacher, student, compute_dtype, cpu=not backend.metal)
    if teacher.bits is None or backend.metal or compute_dtype not in ("auto", "float32"):
        return TeacherForm(False, precision)
    dequantized = TeacherForm(True, replace(precision, teacher=4))
    fits = dequantized.plan(teacher, student, cfg).fits(budget.bytes)
    return dequantized if fits else TeacherForm(False, precision)


class MemoryBudget(Hooks):
    """Stops the job once MLX's peak memory since the job reset it (resident models included) is over
    the budget: a clear ResourceLimitExceeded instead of swapping or the OOM killer. Checked
    wherever the engine asks `should_stop` (between batches, steps and decode chunks); the plan
    (`check_plan`) refuses most jobs that would get here before they start."""

    def __init__(self, budget: int, source: str | None = None):
        self.budget = budget
        self.source = source or f"KD_MAX_JOB_MEMORY={budget:,}"

    def should_stop(self) -> Stop | None:
        peak = mx.get_peak_memory()
        if peak <= self.budget:
            return None
        return Stop(
            "memory",
            f"the job reached {peak:,} bytes of MLX memory (models included), over its budget of {self.budget:,} "
            f"({self.source}); lower batch_size, max_seq_length, gen_batch_size or gen_max_tokens, or raise the budget",
        )
