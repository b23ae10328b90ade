"""Real mlx-lm LoRA adapters for the tiny student, made without training.

Weights are numpy arrays from a seed (the version's tag) saved with safetensors in mlx-lm's
layout, so a publishing process needs no MLX, `mlx_lm.load(..., adapter_path=...)` really loads
them, and a test can regenerate any version's exact weights to see which one a reader got.
Only `lora_shapes` needs MLX (the caller has called ensure_fast_blas via conftest).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

Shapes = dict[str, list[int]]


def lora_shapes(model_dir: Path, num_layers: int = 2, rank: int = 8, scale: float = 20.0) -> Shapes:
    """Name -> shape of every LoRA array mlx-lm creates for this model and LoRA shape."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": rank, "scale": scale, "dropout": 0.0})
    return {k: list(v.shape) for k, v in tree_flatten(model.trainable_parameters())}


def adapter_config(shapes: Shapes, num_layers: int, scale: float, tag: int) -> dict:
    rank = next(s[1] for k, s in shapes.items() if k.endswith("lora_a"))
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0},
        "kd": {"tag": tag},
    }


def lora_weights(shapes: Shapes, tag: int) -> dict[str, np.ndarray]:
    """Reproducible per tag; large enough that two versions generate different text."""
    rng = np.random.default_rng(tag)
    out = {}
    for name, shape in sorted(shapes.items()):
        std = 1.0 / np.sqrt(shape[0]) if name.endswith("lora_a") else 0.05
        out[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return out


def write_adapter(stage: Path, shapes: Shapes, tag: int, num_layers: int = 2, scale: float = 20.0) -> None:
    """adapters.safetensors + adapter_config.json + kd_metrics.json, each naming `tag`."""
    from safetensors.numpy import save_file

    save_file(
        lora_weights(shapes, tag), str(stage / "adapters.safetensors"), metadata={"format": "mlx", "tag": str(tag)}
    )
    (stage / "adapter_config.json").write_text(json.dumps(adapter_config(shapes, num_layers, scale, tag)))
    (stage / "kd_metrics.json").write_text(json.dumps({"tag": tag}))
