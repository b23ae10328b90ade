"""Loading teacher and student models: mlx-lm's own loader, typed errors, compute dtype,
identity hashes for cache keys, and the body/head split that lets the LM head run only on
response positions (every avoided full-vocabulary row counts on the CPU)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import structlog
from mlx.utils import tree_flatten

from jobs.errors import ModelError
from jobs.publisher import sha256_file, write_json_atomic

log = structlog.get_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class LoadedModel:
    path: Path
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    identity: str  # sha256 over config, tokenizer files and weights
    tokenizer_identity: str  # sha256 over the tokenizer files alone
    n_tokens: int  # len(tokenizer): real vocabulary, never config.vocab_size
    rows: int  # embedding rows (>= n_tokens; the rest is padding)
    split: tuple[Callable, Callable] | None  # (body, head) when the architecture allows it
    dequantized: bool = False  # a quantized checkpoint held as float weights (CPU backend, when it fits)

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer._tokenizer

    @property
    def eos_id(self) -> int:
        """The end-of-turn token the chat template writes (the tokenizer's eos, else mlx-lm's first)."""
        eos = self.hf_tokenizer.eos_token_id
        return int(eos if eos is not None else min(self.tokenizer.eos_token_ids))

    @functools.cached_property
    def token_table(self):
        """Token id -> exact bytes (kd_worker.engine.tokmap), built once per resident model (152k entries)."""
        from kd_worker.engine.tokmap import token_table

        return token_table(self.hf_tokenizer)


def compute_dtype(setting: str) -> mx.Dtype | None:
    """float32 on the CPU backend (bf16 matmuls are ~50x slower there); the checkpoint's on Metal."""
    if setting != "auto":
        return getattr(mx, setting)
    return mx.float32 if mx.default_device() == mx.cpu else None


def model_identity(path: Path, cache_file: Path | None = None) -> tuple[str, str]:
    """(model identity, tokenizer identity): content hashes; weight hashes are cached by stat."""
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    tok = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            tok.update(name.encode() + b"\0" + (path / name).read_bytes())
    full = hashlib.sha256(tok.hexdigest().encode())
    full.update((path / "config.json").read_bytes())
    known = len(cache)
    for weights in sorted(path.glob("*.safetensors")):
        st = weights.stat()
        key = f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(weights)  # seconds for a 4 GB teacher: once per file version
        full.update(weights.name.encode() + cache[key].encode())
    if cache_file is not None and len(cache) != known:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    return full.hexdigest(), tok.hexdigest()


def head_rows(layer: nn.Module, h: mx.array, n: int | None = None) -> mx.array:
    """The LM head `layer` (an lm_head Linear, or a tied Embedding used as a linear layer) on h,
    for its first n output rows only: the real tokens, never the embedding's padding rows. The
    logits come out contiguous; slicing full logits instead leaves a strided view that later ops
    copy (one more [rows, V] array per pass)."""
    tied = isinstance(layer, nn.Embedding | nn.QuantizedEmbedding)
    if isinstance(layer, nn.QuantizedLinear | nn.QuantizedEmbedding):
        biases = layer.get("biases")
        out = mx.quantized_matmul(
            h,
            layer["weight"][:n],
            scales=layer["scales"][:n],
            biases=None if biases is None else biases[:n],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    elif isinstance(layer, nn.Linear | nn.Embedding):
        out = h @ layer["weight"][:n].T
    else:  # another head (e.g. with LoRA): the full logits, sliced
        out = (layer.as_linear(h) if hasattr(layer, "as_linear") else layer(h))[..., :n]
        return out if n is None else mx.contiguous(out)
    if not tied and "bias" in layer:
        out = out + layer["bias"][:n]
    return out


def split_model(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(body, head) for mlx-lm models shaped like Qwen2/Llama: body -> final-norm hidden states,
    head(h, n=None) -> logits of the first n tokens. Looked up at call time so LoRA wrappers added
    later are used. Verified against the full forward; None (use the full forward) when the shape
    does not match."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):

        def head(h, n=None):
            return head_rows(model.model.embed_tokens, h, n)
    elif hasattr(model, "lm_head"):

        def head(h, n=None):
            return head_rows(model.lm_head, h, n)
    else:
        return None

    def body(x):
        return model.model(x)

    probe = mx.array([[1, 2, 3, 4]])
    try:
        ok = mx.allclose(model(probe), head(body(probe)), atol=1e-4, rtol=1e-3).item()
    except (TypeError, ValueError, AttributeError):
        ok = False
    return (body, head) if ok else None


def read_config(path: Path) -> dict[str, Any]:
    """A model directory's config.json (ModelError naming what is wrong when it is missing or not JSON)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError as e:
        raise ModelError(f"{path} has no config.json; is it a Hugging Face model directory?") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}/config.json cannot be read as JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelError(f"{path}/config.json is not a JSON object")
    return config


def load_model_dir(
    path: Path, dtype_setting: str = "auto", identity_cache: Path | None = None, dequantize: bool = False
) -> LoadedModel:
    """Load an HF-layout model directory with mlx-lm; every failure is a ModelError naming the path.
    `dequantize`: a quantized checkpoint's weights become float matrices (mlx-lm's
    dequantize_model), then the compute dtype: on MLX's CPU backend quantized matmuls are an
    order of magnitude slower than float32 ones (`quantized_slowdown`)."""
    import mlx_lm

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist or is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelError(f"model directory {path} is not readable (check its permissions)")
    config = read_config(path)
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"{path} has no *.safetensors weights")
    try:
        model, tokenizer = mlx_lm.load(str(path))[:2]  # (model, tokenizer[, config])
    except Exception as e:  # third-party loaders raise many types; the job needs one clear error
        raise ModelError(f"cannot load model {path}: {type(e).__name__}: {e}") from e
    dequantize = dequantize and bool(config.get("quantization"))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    dtype = compute_dtype(dtype_setting)
    if dtype is not None:
        model.set_dtype(dtype)
    if dequantize:
        mx.eval(model.parameters())  # the packed weights are freed now, not at the first forward
    model.eval()
    n_tokens = len(tokenizer._tokenizer)
    rows = int(config.get("vocab_size") or model.model.embed_tokens.weight.shape[0])
    if n_tokens > rows:
        raise ModelError(
            f"{path}: the tokenizer has {n_tokens} tokens but the model's embedding has only {rows} rows; "
            "tokenizer and weights do not belong together"
        )
    identity, tok_identity = model_identity(path, identity_cache)
    log.info(
        "model_loaded",
        path=str(path),
        model_type=config.get("model_type"),
        tokens=n_tokens,
        rows=rows,
        dequantized=dequantize,
        resident_bytes=resident_bytes(model),
    )
    return LoadedModel(path, model, tokenizer, identity, tok_identity, n_tokens, rows, split_model(model), dequantize)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters as held in memory (quantized ones packed)."""
    return sum(int(v.nbytes) for _, v in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))


def quantized_slowdown(d_in: int, d_out: int, bits: int, group_size: int, rows: int = 32, repeats: int = 3) -> float:
    """How many times longer a quantized [rows, d_in] x [d_in, d_out] matmul takes than the same
    weights dequantized to float32, measured here (best of `repeats`). On MLX's CPU backend it is
    an order of magnitude; on Metal quantized is the fast path."""
    import time

    w = mx.random.normal((d_out, d_in)) * d_in**-0.5
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    dense = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    x = mx.random.normal((rows, d_in))
    mx.eval(wq, scales, biases, dense, x)

    def best(fn: Callable[[], mx.array]) -> float:
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        return min(times)

    quant = best(lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits))
    return quant / max(best(lambda: x @ dense.T), 1e-9)


def hidden_at(lm: LoadedModel, inputs: mx.array, positions: mx.array) -> mx.array:
    """Final hidden states [N, D] at the flat `positions` of `inputs` [B, L]; without a body/head
    split, the full logits [N, rows] instead (then `head_logits` only slices them). Under autodiff
    that fallback is the one [rows, V] array not bounded by a chunk; `logit_chunks` (no gradient)
    bounds it by one sequence."""
    if lm.split is not None:
        h = lm.split[0](inputs)
    else:
        h = lm.model(inputs)
    return h.reshape(-1, h.shape[-1])[positions]


def head_logits(lm: LoadedModel, h: mx.array, n_vocab: int) -> mx.array:
    """Float32 logits [n, n_vocab] for hidden states from `hidden_at` (padding rows never computed,
    or sliced off the fallback's full logits)."""
    logits = lm.split[1](h, n_vocab) if lm.split is not None else h[:, :n_vocab]
    return logits.astype(mx.float32)


def logit_chunks(
    lm: LoadedModel, inputs: np.ndarray, positions: np.ndarray, n_vocab: int, rows: int
) -> Iterator[tuple[np.ndarray, mx.array]]:
    """(row indices into `positions`, lazy float32 logits [<= rows, n_vocab]) for every flat
    position of `inputs` [B, L], in order, without a gradient. The consumer evaluates each chunk
    before asking for the next, so one chunk of [rows, V] is alive at a time. With a body/head
    split the body runs once (evaluated first, so its activations are gone before the head
    starts); without one, the full forward runs one sequence at a time (one [L, V] array)."""
    if lm.split is not None:
        h = hidden_at(lm, mx.array(inputs), mx.array(positions))
        mx.eval(h)
        for s in range(0, len(positions), rows):
            yield np.arange(s, min(s + rows, len(positions))), head_logits(lm, h[s : s + rows], n_vocab)
        return
    width = inputs.shape[1]
    for b in range(inputs.shape[0]):
        mine = np.flatnonzero(positions // width == b)
        if mine.size == 0:
            continue
        logits = lm.model(mx.array(inputs[b : b + 1]))[0]  # [L, rows] of one sequence
        for s in range(0, mine.size, rows):
            idx = mine[s : s + rows]
            yield idx, head_logits(lm, logits[mx.array(positions[idx] - b * width)], n_vocab)
