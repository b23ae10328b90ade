"""Random-init models of published Qwen2.5 shapes over the real vocabulary (benchmarks at real size)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from jobs.errors import ModelError
from kd_worker.fixtures.qwenvocab import QWEN25_SHAPES, build_qwen_shaped, draw, qwen25_config, qwen25_shape


def test_published_shapes_and_deterministic_tensors():
    cfg = qwen25_config("0.5B")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (896, 24, 14)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 4864, 151_936)
    assert cfg["tie_word_embeddings"] and not qwen25_config("7B")["tie_word_embeddings"]
    assert qwen25_config("7B")["vocab_size"] == 152_064 and set(QWEN25_SHAPES) == {"0.5B", "1.5B", "3B", "7B"}
    with pytest.raises(ModelError, match="unknown Qwen2.5 shape"):
        qwen25_config("2B")
    assert qwen25_shape("7B", layers=2).num_hidden_layers == 2 and qwen25_shape("7B", 2).name == "7B-2L"

    def tensor(name: str, seed: int = 0, dtype=mx.bfloat16) -> np.ndarray:
        t = draw(name, (8, 64), "linear", dtype, seed)
        assert t.dtype == dtype  # drawn in the checkpoint's dtype: no float32 copy of a 7B
        return np.array(t.astype(mx.float32))

    a = tensor("model.layers.0.mlp.up_proj.weight")
    assert np.array_equal(a, tensor("model.layers.0.mlp.up_proj.weight"))
    assert not np.array_equal(a, tensor("model.layers.1.mlp.up_proj.weight"))
    assert not np.array_equal(a, tensor("model.layers.0.mlp.up_proj.weight", seed=1))
    assert np.abs(a).max() <= 64**-0.5 and a.std() > 0
    assert (np.array(draw("model.norm.weight", (4,), "ones", mx.float32, 0)) == 1).all()


def test_a_quantized_build_loads_in_mlx_lm_as_stored(tmp_path):
    """bits=4: every 2-D weight written quantized (weight/scales/biases, 4-bit packed), the config
    says so, and mlx-lm loads it as a quantized model (2 blocks of the 0.5B shape)."""
    import mlx_lm
    from mlx.utils import tree_flatten

    out = build_qwen_shaped(tmp_path / "q4", "0.5B", "bfloat16", bits=4, layers=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"} and cfg["num_hidden_layers"] == 2
    model, _ = mlx_lm.load(str(out))
    params = dict(tree_flatten(model.parameters()))
    embed = params["model.embed_tokens.weight"]
    assert embed.dtype == mx.uint32 and embed.shape == (151_936, 896 * 4 // 32)
    assert params["model.layers.1.mlp.down_proj.scales"].dtype == mx.bfloat16


@pytest.mark.slow
def test_the_0_5b_shape_loads_with_mlx_lm_and_is_cached(tmp_path):
    import mlx_lm
    from mlx.utils import tree_flatten

    out = build_qwen_shaped(tmp_path / "q", "0.5B")
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_qwen_shaped(tmp_path / "q", "0.5B") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # reused, not rebuilt
    model, tok = mlx_lm.load(str(out))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 494_032_768  # Qwen2.5-0.5B
    assert len(tok) == 151_665 and tok.eos_token == "<|im_end|>"
    assert len(mlx_lm.generate(model, tok, tok.encode("Hello"), max_tokens=2)) > 0
