"""Token byte strings and the teacher -> student vocabulary map for cross-tokenizer distillation.

Two tokenizers can only be compared on the text their tokens stand for. A token's string is
not that text: byte-level BPE (GPT-2, Llama-3, Qwen) spells each byte as a printable
character ("Ġ" is a space), sentencepiece marks a word start with "▁" and spells unknown
characters as byte pieces "<0xE6>". `TokenTable` undoes those markers so each id maps to the
exact bytes it stands for; a teacher token maps to the student token of identical bytes.
Special tokens stand for no text; the end-of-turn tokens map to each other by role.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np

from jobs.errors import VocabularyMismatch

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
Scheme = Literal["byte_level", "metaspace", "plain"]


@cache
def byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's bytes_to_unicode: the printable character that spells each byte (index = byte)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for _, c in sorted(zip(bs, cs, strict=True)))


@cache
def _byte_level_decoder() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_level_alphabet())}


def _components(spec: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for key in ("normalizer", "pre_tokenizer", "decoder"):
        walk(spec.get(key))
    return found


def tokenizer_scheme(spec: dict[str, Any]) -> Scheme:
    """How token strings encode text, read from a tokenizer.json document."""
    parts = _components(spec)
    if any(p["type"] == "ByteLevel" for p in parts):
        return "byte_level"
    if any(
        p["type"] == "Metaspace" or (p["type"] == "Replace" and "▁" in json.dumps(p, ensure_ascii=False)) for p in parts
    ):
        return "metaspace"
    model = spec.get("model", {}).get("type")
    if model in ("BPE", "Unigram"):
        return "plain"
    raise VocabularyMismatch(
        f"cannot map tokens of a {model} tokenizer to bytes for cross-tokenizer distillation; "
        "supported: byte-level BPE (GPT-2/Llama-3/Qwen) and sentencepiece-style (Metaspace, byte fallback)"
    )


def piece_bytes(token: str, scheme: Scheme, byte_fallback: bool) -> bytes:
    """The text bytes one (non-added) vocabulary entry stands for."""
    if scheme == "byte_level":
        dec = _byte_level_decoder()
        return bytes(dec[c] for c in token) if all(c in dec for c in token) else token.encode()
    if byte_fallback and (m := BYTE_PIECE.fullmatch(token)):
        return bytes([int(m.group(1), 16)])
    return (token.replace("▁", " ") if scheme == "metaspace" else token).encode()


@dataclass(frozen=True)
class TokenTable:
    """id -> the bytes of text a token stands for (None: a special token, no text), and the
    inverse the tokenizer itself would use (a normal piece before a byte-fallback duplicate)."""

    pieces: tuple[bytes | None, ...]
    preferred: dict[bytes, int]
    specials: dict[str, int]
    scheme: Scheme


def token_table(hf_tokenizer: Any) -> TokenTable:
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    scheme = tokenizer_scheme(spec)
    fallback = bool(spec.get("model", {}).get("byte_fallback"))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab = hf_tokenizer.get_vocab()
    pieces: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    specials: dict[str, int] = {}
    byte_pieces: set[int] = set()
    for tok, i in vocab.items():
        if i in added:
            if added[i].get("special"):
                specials[tok] = i
            else:
                pieces[i] = added[i]["content"].encode()  # plain text added whole (<tool_call>)
            continue
        pieces[i] = piece_bytes(tok, scheme, fallback)
        if fallback and BYTE_PIECE.fullmatch(tok):
            byte_pieces.add(i)
    preferred: dict[bytes, int] = {}
    # a tokenizer emits a byte-fallback piece only for bytes it has no normal piece for
    for i in sorted(range(len(pieces)), key=lambda i: (i in byte_pieces, i)):
        if (piece := pieces[i]) is not None:
            preferred.setdefault(piece, i)
    return TokenTable(tuple(pieces), preferred, specials, scheme)


@dataclass(frozen=True)
class TokenPair:
    """Teacher and student tables plus the teacher -> student id map (-1: no counterpart)."""

    teacher: TokenTable
    student: TokenTable
    tmap: np.ndarray  # [teacher ids] int32
    teacher_eos: frozenset[int]
    student_eos: int

    def map_ids(self, ids: np.ndarray, prefix: bytes = b"") -> np.ndarray:
        """Student ids for teacher ids; with `prefix`, for the bytes prefix + piece (a dummy-prefix space)."""
        if not prefix:
            return self.tmap[ids]
        out = self.tmap[ids].copy()
        for idx, i in np.ndenumerate(ids):
            piece = self.teacher.pieces[i]
            if piece is not None:
                out[idx] = self.student.preferred.get(prefix + piece, -1)
        return out

    def teacher_piece(self, i: int) -> bytes | None:
        return self.teacher.pieces[i] if i < len(self.teacher.pieces) else None


def token_pair(
    teacher_hf: Any, student_hf: Any, teacher_eos: Sequence[int], student_eos: int, n_teacher: int
) -> TokenPair:
    """Exact byte-string mapping of the two vocabularies; end-of-turn and same-named specials by role."""
    return pair_of_tables(token_table(teacher_hf), token_table(student_hf), teacher_eos, student_eos, n_teacher)


def pair_of_tables(
    t: TokenTable, s: TokenTable, teacher_eos: Sequence[int], student_eos: int, n_teacher: int
) -> TokenPair:
    tmap = np.full(max(n_teacher, len(t.pieces)), -1, np.int32)
    for i, piece in enumerate(t.pieces):
        if piece is not None:
            tmap[i] = s.preferred.get(piece, -1)
    for name, i in t.specials.items():
        tmap[i] = s.specials.get(name, -1)
    for i in teacher_eos:
        tmap[i] = student_eos
    return TokenPair(t, s, tmap, frozenset(int(i) for i in teacher_eos), int(student_eos))


def _eos_ids(lm: Any) -> list[int]:
    ids = set(getattr(lm.tokenizer, "eos_token_ids", None) or ())
    if lm.hf_tokenizer.eos_token_id is not None:
        ids.add(int(lm.hf_tokenizer.eos_token_id))
    return sorted(ids)


def pair_for(teacher: Any, student: Any) -> TokenPair:
    """The token pair of two loaded models (LoadedModel-like: hf_tokenizer, tokenizer, n_tokens). Every
    stop token of the teacher maps to the student's own end-of-turn token (the one its template writes)."""
    return pair_of_tables(teacher.token_table, student.token_table, _eos_ids(teacher), student.eos_id, teacher.n_tokens)
