"""KDConfig: the frozen, validated settings of one distillation job.

Defaults follow the design (T=2.0, alpha=0.7, Adam lr 1e-4, 200 iterations). `resolve_config`
is the one place where defaults, the worker's defaults and a job's overrides meet; the result
is saved next to the adapter it produced.
"""

from __future__ import annotations

import difflib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]


class KDConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Loss: what the student learns from the teacher per response token
    temperature: Annotated[float, Field(ge=0.5, le=10.0)] = 2.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7
    top_k: Annotated[int, Field(ge=1, le=65536)] | Literal["full"] = 64
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5

    # LoRA (mlx-lm's names: rank, scale, dropout, num_layers, keys)
    lora_rank: Annotated[int, Field(ge=1, le=512)] = 8
    lora_scale: Annotated[float, Field(gt=0.0, le=1000.0)] = 20.0
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    lora_layers: Annotated[int, Field(ge=-1)] = 16
    lora_keys: tuple[str, ...] | None = None

    # Training: the LoRA loop, validation and checkpoint cadence
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 4
    iterations: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = 512
    val_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    val_every: PositiveInt = 50
    save_every: PositiveInt = 100
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # Which adapter is published: the last step's, or the validation with the lowest held-out KL
    # (steps >= 1; select=best also checkpoints at every validation, so the selected step is on disk)
    select: Literal["last", "best"] = "last"
    patience: Annotated[int, Field(ge=0, le=1_000_000)] = 0  # stop after N validations without a better KL; 0: never

    # On-policy distillation (GKD): a share of the steps train on the student's own samples,
    # scored token by token by the resident teacher (kd_worker/engine/onpolicy.py)
    on_policy: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # share of on-policy steps (GKD's lambda); 0: off
    rollout_every: PositiveInt = 1  # steps between rollout refreshes (1: every on-policy step samples afresh)
    rollout_batch: Annotated[int, Field(ge=0, le=1024)] = 0  # prompts per rollout; 0: batch_size
    rollout_max_tokens: Annotated[int, Field(ge=0, le=32768)] = 0  # 0: gen_max_tokens
    rollout_temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 1.0  # the student's sampling temperature
    # forward KL on the student's samples: on bench.quality's sort task it beat GKD/tinker's reverse KL
    on_policy_divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    on_policy_alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # 1: no CE toward the student's own tokens

    # The continual loop (README "The continual loop"): history replay and warm start. `replay` is the
    # share of each training batch drawn from the domain's corpus (earlier jobs' training examples, at most
    # `replay_max_examples` of them, chosen once per run); `init="current"` starts from the domain's
    # published adapter when its student and LoRA shape match (otherwise from the base, with a warning).
    # Defaults from bench/continual.py (README table): together they keep 97% of job 1's gain after 5 jobs
    # at 0.9x the CPU of a fresh LoRA; either alone keeps 56% (replay) or less than none (warm start).
    replay: Annotated[float, Field(ge=0.0, le=0.9)] = 0.5
    replay_max_examples: Annotated[int, Field(ge=0, le=100_000)] = 512
    init: Literal["base", "current"] = "current"

    # Teacher generation; top_p is applied on a top-k pre-selection, never a full sort.
    gen_max_tokens: Annotated[int, Field(ge=1, le=32768)] = 128
    gen_temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 0.7
    gen_top_k: Annotated[int, Field(ge=0, le=65536)] = 40
    gen_top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    gen_batch_size: Annotated[int, Field(ge=1, le=256)] = 8

    # Readable held-out samples in kd_metrics.json: the student's greedy answers before and after
    # training for the first `samples` held-out prompts (0: none; engine.samples)
    samples: Annotated[int, Field(ge=0, le=64)] = 3

    # Cross-tokenizer distillation (teacher and student tokenizers differ)
    xtok_unaligned: Literal["ce", "uld"] = "uld"  # loss at positions without an alignment (CE always applies)
    xtok_uld_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0  # ULD term relative to the per-token KL
    xtok_min_coverage: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # share of positions aligned / mass mapped
    xtok_low_coverage: Literal["refuse", "warn"] = "refuse"  # below xtok_min_coverage

    @model_validator(mode="after")
    def _check(self) -> "KDConfig":
        if self.lora_layers == 0:
            raise ValueError("lora_layers must be -1 (all) or a positive number of layers")
        return self

    def lora_parameters(self) -> dict[str, Any]:
        """mlx-lm's `lora_parameters` block (adapter_config.json)."""
        params: dict[str, Any] = {"rank": self.lora_rank, "scale": self.lora_scale, "dropout": self.lora_dropout}
        if self.lora_keys is not None:
            params["keys"] = list(self.lora_keys)
        return params


FIELDS = tuple(KDConfig.model_fields)


def resolve_config(*layers: dict[str, Any]) -> KDConfig:
    """Merge override dicts (later wins) onto the defaults; unknown or bad keys are ConfigErrors."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key not in KDConfig.model_fields:
                hint = difflib.get_close_matches(key, FIELDS, n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else f"; known settings: {', '.join(FIELDS)}"
                raise ConfigError(f"unknown KD setting {key!r}{tip}")
            merged[key] = value
    try:
        return KDConfig(**merged)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}={err.get('input')!r}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid KD settings: {problems}") from e


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings (CLI --set) to a dict; values are JSON where they parse, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out
