"""Hot swap vs reload: what the cortex pays to serve a newly published adapter.

full load    mlx_lm.load(base, adapter_path=version): what a restart or reload costs
hot swap     AdapterSlot.apply(version) on the resident model: manifest sha256s, read the
             adapter, check names/shapes, replace the LoRA arrays (same LoRA shape)
re-wrap      the same, when the new version has another LoRA shape (rank 4 instead of 8)
verify only  publisher.verify(version): the checksum part of the swap
Files are in the page cache (the best case for the full load). All layers adapted, rank 8.

    .venv/bin/python -m bench.hotswap [--shapes tiny,medium,large] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import best_of, report

SHAPES = {  # hidden, layers, intermediate (Qwen2 architecture, the demo tokenizer)
    "medium": (512, 8, 1408),
    "large": (1024, 16, 2816),
}


def build(shape: str, root: Path) -> Path:
    from kd_worker.fixtures import tinymodels as tm

    if shape == "tiny":
        return tm.build_demo_models(root, ("student",))["student"]
    hidden, layers, inter = SHAPES[shape]
    spec = replace(
        tm.SPECS["student"], name=f"student-{shape}", hidden_size=hidden, num_layers=layers, intermediate_size=inter
    )
    return tm.build_model(spec, root / spec.name)


def publish_random(model_dir: Path, root: Path, seed: int, rank: int) -> Path:
    """A published version with random (non-zero) LoRA weights in mlx-lm's layout."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from jobs import publisher

    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * 0.01 for k, v in tree_flatten(model.trainable_parameters())}
    config = {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": params}

    def write(stage: Path) -> None:
        mx.save_safetensors(str(stage / "adapters.safetensors"), weights, metadata={"format": "mlx"})
        publisher.write_json_atomic(stage / "adapter_config.json", config)
        publisher.write_json_atomic(stage / "kd_metrics.json", {"seed": seed})

    return publisher.publish(root, "memory", write, {"seed": seed}, keep=10).path


def measure(shape: str, tmp: Path, repeats: int) -> list:
    import mlx_lm
    from mlx.utils import tree_flatten

    from jobs import publisher
    from kd_client.hotswap import AdapterSlot

    base = build(shape, tmp / "models")
    a, b, narrow = (publish_random(base, tmp / shape, seed, rank) for seed, rank in ((1, 8), (2, 8), (3, 4)))
    model, _ = mlx_lm.load(str(base), adapter_path=str(a))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    slot = AdapterSlot(model, adapter_path=a)

    def swap() -> None:  # alternate, so every swap really changes the weights
        slot.apply(b if slot.current.path == a else a)

    def rewrap() -> None:
        slot.apply(narrow if slot.current.path != narrow else a)

    full = best_of(lambda: mlx_lm.load(str(base), adapter_path=str(a)), repeats)
    hot = best_of(swap, repeats)
    wrap = best_of(rewrap, repeats)
    check = best_of(lambda: publisher.verify(a), repeats)
    size = (a / "adapters.safetensors").stat().st_size
    return [
        shape,
        f"{n_params / 1e6:.1f}M",
        f"{size / 1e6:.2f} MB",
        full * 1000,
        hot * 1000,
        wrap * 1000,
        check * 1000,
        hot / full,
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,medium,large")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(s, Path(tmp), args.repeats) for s in args.shapes.split(",")]
    report(
        "hotswap",
        f"in-place adapter swap vs full mlx_lm.load (best of {args.repeats})",
        ["model", "params", "adapter", "full load ms", "hot swap ms", "re-wrap ms", "verify ms", "swap/load"],
        rows,
        {"repeats": args.repeats, "notes": "files in page cache; all layers adapted; rank 8 (re-wrap: 8<->4)"},
    )


if __name__ == "__main__":
    main()
