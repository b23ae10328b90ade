"""Random-init models of published Qwen2.5 shapes over the real vocabulary (benchmarks at real size)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.errors import ModelError
from kd_worker.fixtures.qwenvocab import QWEN25_SHAPES, _tensor, build_qwen_shaped, qwen25_config


def test_published_shapes_and_deterministic_tensors():
    cfg = qwen25_config("0.5B")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (896, 24, 14)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 4864, 151_936)
    assert cfg["tie_word_embeddings"] and not qwen25_config("7B")["tie_word_embeddings"]
    assert qwen25_config("7B")["vocab_size"] == 152_064 and set(QWEN25_SHAPES) == {"0.5B", "1.5B", "3B", "7B"}
    with pytest.raises(ModelError, match="unknown Qwen2.5 shape"):
        qwen25_config("2B")
    a = _tensor("model.layers.0.mlp.up_proj.weight", (8, 4), seed=0)
    assert np.array_equal(a, _tensor("model.layers.0.mlp.up_proj.weight", (8, 4), seed=0))
    assert not np.array_equal(a, _tensor("model.layers.1.mlp.up_proj.weight", (8, 4), seed=0))
    assert not np.array_equal(a, _tensor("model.layers.0.mlp.up_proj.weight", (8, 4), seed=1))
    assert (_tensor("model.norm.weight", (4,), 0) == 1).all() and (_tensor("x.q_proj.bias", (4,), 0) == 0).all()


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
