"""Small but real Hugging-Face-layout causal LMs, built deterministically from this repo's own files.

No hub is reachable in CI, so tests and the demo build their models here: byte-level BPE
tokenizers trained with `tokenizers` on a corpus shipped in the package, and models made with
mlx-lm's own classes and save helpers (`config.json` + `model.safetensors`), so `mlx_lm.load`
and `mlx_lm generate` treat them like any `mlx-community/...` checkpoint.

The set mirrors the real pairings the engine must handle:
  teacher        Qwen2 architecture, ChatML template, embedding padded past its tokenizer
                 (like Qwen2.5-7B: 152,064 rows for 151,665 tokens)
  student        smaller Qwen2 over the *same* tokenizer with fewer padding rows
                 (like Qwen2.5-3B: 151,936 rows), tied embeddings
  student-llama  Llama architecture, a *different* tokenizer (other vocabulary size, adds a
                 BOS, Llama-3 chat template)
  student-sp     Llama architecture, a sentencepiece-style tokenizer (Llama-2/Mistral: "▁" word
                 marks, a dummy-prefix space, byte-fallback pieces, [INST] template)
  *-4bit/-8bit   mlx-lm quantized variants (QLoRA students, quantized teachers)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

BUILDER_VERSION = 1

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    vocab_size: int
    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None
    chat_template: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str  # an mlx-lm architecture: "qwen2" or "llama"
    tokenizer: TokenizerSpec
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    extra_rows: int  # embedding rows beyond len(tokenizer), like real checkpoints' padding
    tie_embeddings: bool
    seed: int


QWEN_TOKENIZER = TokenizerSpec(
    name="chatml-1000",
    vocab_size=1000,
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    bos=None,
    chat_template=CHATML_TEMPLATE,
)
LLAMA_TOKENIZER = TokenizerSpec(
    name="llama3-800",
    vocab_size=800,
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    eos="<|eot_id|>",
    pad="<|end_of_text|>",
    bos="<|begin_of_text|>",
    chat_template=LLAMA3_TEMPLATE,
)


@dataclass(frozen=True)
class SentencePieceSpec(TokenizerSpec):
    """A sentencepiece-style BPE: Metaspace ("▁", dummy prefix), byte fallback <0x00>..<0xFF>."""

    kind: str = "sentencepiece"  # part of the digest: another builder than the byte-level one


LLAMA2_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- else %}{{- '[INST] ' + message['content'] | trim + ' [/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
SP_TOKENIZER = SentencePieceSpec(
    name="sp-1000",
    vocab_size=1000,
    specials=("<unk>", "<s>", "</s>"),
    eos="</s>",
    pad="<unk>",
    bos="<s>",
    chat_template=LLAMA2_TEMPLATE,
)

SPECS = {
    s.name: s
    for s in (
        ModelSpec("teacher", "qwen2", QWEN_TOKENIZER, 256, 4, 4, 2, 512, extra_rows=88, tie_embeddings=False, seed=1),
        ModelSpec("student", "qwen2", QWEN_TOKENIZER, 128, 2, 4, 2, 256, extra_rows=24, tie_embeddings=True, seed=2),
        ModelSpec("student-llama", "llama", LLAMA_TOKENIZER, 128, 2, 4, 2, 256, extra_rows=32, tie_embeddings=True, seed=3),
        ModelSpec("student-sp", "llama", SP_TOKENIZER, 128, 2, 4, 2, 256, extra_rows=8, tie_embeddings=True, seed=4),
    )
}
QUANTIZED = {"teacher-4bit": ("teacher", 4), "teacher-8bit": ("teacher", 8), "student-4bit": ("student", 4)}
ALL_NAMES = tuple(SPECS) + tuple(QUANTIZED)


def bundled_prompts() -> list[str]:
    """The prompts of the bundled domain sample sets (jobs/samples/*.jsonl), in file order."""
    samples = resources.files("jobs").joinpath("samples")
    names = sorted(p.name for p in samples.iterdir() if p.name.endswith(".jsonl"))
    return [json.loads(line)["prompt"] for name in names
            for line in samples.joinpath(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus_text() -> str:
    """The frozen corpus plus the bundled domain prompts (the demo's own vocabulary)."""
    asset = resources.files("kd_worker").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    return "\n".join([asset, *bundled_prompts()])


def train_tokenizer(spec: TokenizerSpec, text: str):
    """A byte-level BPE tokenizer (GPT-2/Qwen/Llama-3 style) trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if isinstance(spec, SentencePieceSpec):
        return train_sp_tokenizer(spec, text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    if spec.bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_sp_tokenizer(spec: SentencePieceSpec, text: str):
    """A sentencepiece-style BPE trained on `text`, laid out like a converted Llama-2/Mistral
    tokenizer.json: specials, then the 256 byte pieces, then the learned pieces."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
    from tokenizers import models as tmodels

    base = Tokenizer(tmodels.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - 256, special_tokens=list(spec.specials), show_progress=False)
    base.train_from_iterator(text.split("\n\n"), trainer=trainer)
    doc = json.loads(base.to_str())
    n_sp, learned = len(spec.specials), doc["model"]["vocab"]
    vocab = {tok: i for tok, i in learned.items() if i < n_sp}
    vocab.update({f"<0x{b:02X}>": n_sp + b for b in range(256)})
    vocab.update({tok: i + 256 for tok, i in learned.items() if i >= n_sp})
    doc["model"].update(vocab=vocab, byte_fallback=True, unk_token=spec.specials[0])
    doc["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(doc))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    return tok


def tokenizer_config(spec: TokenizerSpec) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": spec.chat_template,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "bos_token": spec.bos,
        "add_bos_token": spec.bos is not None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }


def model_config(spec: ModelSpec, n_tokens: int, eos_id: int, bos_id: int | None) -> dict:
    cfg = {
        "model_type": spec.model_type,
        "architectures": ["Qwen2ForCausalLM" if spec.model_type == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": n_tokens + spec.extra_rows,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": spec.tie_embeddings,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    return cfg


def spec_digest(spec: ModelSpec) -> str:
    blob = json.dumps({"v": BUILDER_VERSION, "spec": asdict(spec)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_dir_atomic(out: Path, write: Callable[[Path], None]) -> Path:
    """A directory written atomically: `write` fills a stage next to `out`, then it is renamed."""
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    write(stage)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return out


def save_model_dir(out: Path, model, config: dict, write_extra: Callable[[Path], None]) -> Path:
    """An HF-layout model directory, atomically. mlx-lm's own helpers write the weights and
    config; `write_extra` adds tokenizer files."""
    from mlx_lm.utils import save_config, save_model

    def write(stage: Path) -> None:
        save_model(stage, model)
        save_config(dict(config), stage / "config.json")
        write_extra(stage)

    return write_dir_atomic(out, write)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)


def random_model(config: dict, seed: int):
    """An mlx-lm model of `config`'s architecture with deterministic random weights."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    return model


def build_model(spec: ModelSpec, out: Path) -> Path:
    """Build one model directory (atomically: staged, then renamed)."""
    tok = train_tokenizer(spec.tokenizer, corpus_text())
    bos_id = tok.token_to_id(spec.tokenizer.bos) if spec.tokenizer.bos else None
    cfg = model_config(spec, tok.get_vocab_size(), tok.token_to_id(spec.tokenizer.eos), bos_id)

    def extra(stage: Path) -> None:
        tok.save(str(stage / "tokenizer.json"))
        _write_json(stage / "tokenizer_config.json", tokenizer_config(spec.tokenizer))
        _write_json(stage / "kd_fixture.json", {"name": spec.name, "digest": spec_digest(spec)})

    return save_model_dir(out, random_model(cfg, spec.seed), cfg, extra)


def quantize_dir(src: Path, out: Path, bits: int, group_size: int = 64) -> Path:
    """An mlx-lm quantized copy of a model directory (what `mlx_lm convert -q` produces)."""
    from mlx_lm.utils import load, quantize_model

    model, _, cfg = load(str(src), return_config=True)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits-per-weight
        model, qcfg = quantize_model(model, cfg, group_size=group_size, bits=bits)
    marker = json.loads((src / "kd_fixture.json").read_text())

    def extra(stage: Path) -> None:
        copy_tokenizer(src, stage)
        _write_json(stage / "kd_fixture.json", {"name": out.name, "digest": f"{marker['digest']}-q{bits}"})

    return save_model_dir(out, model, qcfg, extra)


def up_to_date(path: Path, digest: str, marker: str = "kd_fixture.json") -> bool:
    """Whether the directory was built by a recipe with this digest (its marker file says so)."""
    try:
        return json.loads((path / marker).read_text())["digest"] == digest
    except (OSError, ValueError, KeyError):
        return False


def build_demo_models(root: Path, names: tuple[str, ...] = ALL_NAMES) -> dict[str, Path]:
    """Build (or reuse, when already built by this builder version) the named fixtures under root."""
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    wanted = set(names) | {QUANTIZED[n][0] for n in names if n in QUANTIZED}
    for name, spec in SPECS.items():
        if name in wanted:
            path = root / name
            if not up_to_date(path, spec_digest(spec)):
                log.info("building_model", name=name, path=str(path))
                build_model(spec, path)
            paths[name] = path
    for name, (base, bits) in QUANTIZED.items():
        if name in names:
            path = root / name
            if not up_to_date(path, f"{spec_digest(SPECS[base])}-q{bits}"):
                log.info("quantizing_model", name=name, bits=bits)
                quantize_dir(paths[base], path, bits)
            paths[name] = path
    return {n: p for n, p in paths.items() if n in names}
