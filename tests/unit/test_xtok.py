"""Cross-tokenizer alignment, vocabulary mapping and target projection on hand-built cases,
against numpy references; real (tiny) byte-level and sentencepiece-style tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from test_losses import np_log_softmax

from jobs.config import resolve_config
from jobs.errors import VocabularyMismatch
from kd_worker.engine import xtok
from kd_worker.engine.data import SoftTargets
from kd_worker.engine.tokmap import piece_bytes, token_pair, token_table
from kd_worker.engine.xtok import Group, align, anchor, spans_of, student_spans, teacher_text
from kd_worker.fixtures import tinymodels as tm


def groups(s_pieces, t_pieces, text=None):
    data = b"".join(p for p in t_pieces if p) if text is None else text
    s_spans, limit, _ = student_spans(s_pieces, data)
    return align(s_spans, spans_of(t_pieces), limit)


def shape(gs):
    """(student count, teacher count) per group: the readable form of an alignment."""
    return [(g.student[1] - g.student[0], g.teacher[1] - g.teacher[0]) for g in gs]


# ---------------------------------------------------------------- alignment on hand-built cases


def test_identical_tokenizations_align_one_to_one():
    p = [b"The", b" cat", b" sat", b"."]
    gs = groups(p, p)
    assert shape(gs) == [(1, 1)] * 4 and all(g.aligned for g in gs)
    assert [g.teacher for g in gs] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_student_token_over_several_teacher_tokens_is_one_aligned_group():
    gs = groups([b" unbelievable", b"!"], [b" un", b"believ", b"able", b"!"])
    assert shape(gs) == [(1, 3), (1, 1)]
    assert gs[0].aligned and gs[0].teacher == (0, 3)


def test_teacher_token_over_several_student_tokens_is_unaligned():
    gs = groups([b" un", b"believ", b"able", b"!"], [b" unbelievable", b"!"])
    assert shape(gs) == [(3, 1), (1, 1)]
    assert not gs[0].aligned and gs[1].aligned


def test_crossing_boundaries_form_one_group_up_to_the_next_common_boundary():
    gs = groups([b"ab", b"c", b"d"], [b"a", b"bc", b"d"])
    assert shape(gs) == [(2, 2), (1, 1)] and not gs[0].aligned and gs[1].aligned


def test_multibyte_characters_split_differently_align_at_character_bytes():
    nihon = "日本".encode()  # e6 97 a5 e6 9c ac
    teacher = [nihon[:2], nihon[2:3], nihon[3:]]
    student = [nihon[:1], nihon[1:3], nihon[3:]]
    gs = groups(student, teacher)
    assert shape(gs) == [(2, 2), (1, 1)]
    assert not gs[0].aligned and gs[1].aligned and gs[1].teacher == (2, 3)


def test_sentencepiece_dummy_prefix_space_is_cut_from_the_first_token():
    text = b"Hello world"
    spans, limit, phantom = student_spans([b" Hello", b" world"], text)
    assert phantom and limit == len(text)
    assert spans.tolist() == [[0, 5], [5, 11]]
    assert shape(align(spans, spans_of([b"Hello", b" world"]), limit)) == [(1, 1), (1, 1)]


def test_a_real_leading_space_is_not_mistaken_for_a_dummy_prefix():
    text = b" Hello"
    spans, limit, phantom = student_spans([b" Hello"], text)
    assert not phantom and spans.tolist() == [[0, 6]] and limit == 6
    # sentencepiece on text that starts with a space: "▁" + "▁Hello"; the lone dummy space aligns with nothing
    spans, limit, phantom = student_spans([b" ", b" Hello"], text)
    assert phantom and spans.tolist() == [[0, 0], [0, 6]]
    gs = align(spans, spans_of([b" Hello"]), limit)
    assert shape(gs) == [(1, 0), (1, 1)] and gs[1].aligned


def test_bos_on_the_student_side_only_gets_no_teacher_counterpart():
    gs = groups([None, b"hi", b" there"], [b"hi", b" there"])
    assert shape(gs) == [(1, 0), (1, 1), (1, 1)]
    assert not gs[0].aligned and [g.teacher for g in gs[1:]] == [(0, 1), (1, 2)]


def test_bos_or_special_on_the_teacher_side_only_is_skipped():
    gs = groups([b"hi", b" there"], [None, b"hi", None, b" there"])
    assert shape(gs) == [(1, 1), (1, 1)] and [g.teacher for g in gs] == [(1, 2), (3, 4)]


def test_tokens_past_a_text_difference_are_unaligned():
    # the student's tokenizer normalised the text (e.g. NFC): nothing after the first differing byte aligns
    gs = groups([b"ab", b"X", b"cd"], [b"ab", b"Y", b"cd"], text=b"abYcd")
    assert [g.aligned for g in gs] == [True, False, False]


def test_invalid_bytes_are_dropped_from_the_text_and_their_tokens_never_align():
    text, spans, bad = teacher_text([b"a", b"\xe6", b" b", b"\xe6\x97", b"\xa5"])
    assert text == "a b日".encode()
    assert bad.tolist() == [False, True, False, False, False]
    assert spans.tolist() == [[0, 1], [1, 1], [1, 3], [3, 5], [5, 6]]
    text, spans, bad = teacher_text([b"ok", b" \xe6"])  # a character cut by truncation
    assert text == b"ok " and bad.tolist() == [False, True] and spans.tolist() == [[0, 2], [2, 3]]


def test_anchor_is_the_teacher_token_holding_the_first_byte():
    t_spans = spans_of([b"ab", None, b"cde", b"f"])
    assert [anchor(t_spans, x) for x in (0, 1, 2, 4, 5)] == [0, 0, 2, 2, 3]
    assert anchor(t_spans, 6) is None


# ---------------------------------------------------------------- token tables and the vocabulary map


@pytest.fixture(scope="module")
def tokenizers():
    """The fixtures' tokenizers: byte-level (ChatML, Llama-3 style) and sentencepiece-style."""
    from transformers import PreTrainedTokenizerFast

    text = tm.corpus_text()
    out = {}
    for spec in (tm.QWEN_TOKENIZER, tm.LLAMA_TOKENIZER, tm.SP_TOKENIZER):
        tok = tm.train_tokenizer(spec, text)
        out[spec.name] = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=spec.eos, bos_token=spec.bos, pad_token=spec.pad
        )
    return out


def test_marker_normalisation_of_single_pieces():
    assert piece_bytes("Ġhello", "byte_level", False) == b" hello"
    assert piece_bytes("Ċ", "byte_level", False) == b"\n"
    assert piece_bytes("æĹ¥", "byte_level", False) == "日".encode()
    assert piece_bytes("▁hello", "metaspace", True) == b" hello"
    assert piece_bytes("<0xE6>", "metaspace", True) == b"\xe6"
    assert piece_bytes("<0xE6>", "metaspace", False) == b"<0xE6>"  # no byte fallback: literal text


def test_byte_level_table(tokenizers):
    hf = tokenizers["chatml-1000"]
    t = token_table(hf)
    assert t.scheme == "byte_level"
    assert t.pieces[hf.convert_tokens_to_ids("Ġthe")] == b" the"
    assert t.pieces[hf.convert_tokens_to_ids("<|im_end|>")] is None and "<|im_end|>" in t.specials
    ids = hf.encode("The café — 日本 😀 costs $3.", add_special_tokens=False)
    assert b"".join(t.pieces[i] for i in ids) == "The café — 日本 😀 costs $3.".encode()


def test_sentencepiece_table_prefers_normal_pieces_over_byte_fallback(tokenizers):
    hf = tokenizers["sp-1000"]
    t = token_table(hf)
    assert t.scheme == "metaspace"
    assert t.pieces[hf.convert_tokens_to_ids("<0x61>")] == b"a"
    assert t.preferred[b"a"] == hf.convert_tokens_to_ids("a")  # what the tokenizer itself emits
    assert t.preferred[b"\xe6"] == hf.convert_tokens_to_ids("<0xE6>")
    text = "Hello world — 日本 😀"
    ids = hf.encode(text, add_special_tokens=False)
    assert b"".join(t.pieces[i] for i in ids) == b" " + text.encode()  # the dummy prefix


def test_vocabulary_map_byte_level_teacher_to_sentencepiece_student(tokenizers):
    t_hf, s_hf = tokenizers["chatml-1000"], tokenizers["sp-1000"]
    pair = token_pair(t_hf, s_hf, [t_hf.eos_token_id], s_hf.eos_token_id, len(t_hf))
    tid, sid = t_hf.convert_tokens_to_ids, s_hf.convert_tokens_to_ids
    assert pair.tmap[tid("Ġthe")] == sid("▁the")  # markers normalised on both sides
    assert pair.tmap[tid("<|im_end|>")] == sid("</s>")  # end of turn by role
    assert pair.tmap[tid("<|im_start|>")] == -1  # a special with no counterpart
    mapped = np.flatnonzero(pair.tmap >= 0)
    t_tab, s_tab = pair.teacher, pair.student
    assert all(t_tab.pieces[i] == s_tab.pieces[pair.tmap[i]] for i in mapped if t_tab.pieces[i] is not None)
    assert 0.5 < len(mapped) / len(t_hf) < 1.0
    # the dummy-prefix map: teacher "the" (no space) -> student "▁the"
    assert pair.map_ids(np.array([tid("the")]), prefix=b" ")[0] == sid("▁the")


def test_unsupported_tokenizer_models_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(VocabularyMismatch, match="WordPiece"):
        token_table(PreTrainedTokenizerFast(tokenizer_object=wp))


# ---------------------------------------------------------------- projection against numpy references


def dense_targets(logp_dense: np.ndarray, k: int, temperature: float) -> SoftTargets:
    """Top-k targets the way kd_worker.engine.teacher stores them, from dense float64 log-probs."""
    ids = np.argsort(-logp_dense, axis=-1)[:, :k]
    top = np.take_along_axis(logp_dense, ids, -1)
    rest = np.ones_like(logp_dense, bool)
    np.put_along_axis(rest, ids, False, -1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.where(rest, np.exp(logp_dense), 0.0).sum(-1))
    lse_t = np.log(np.exp(logp_dense / temperature).sum(-1))
    n = len(logp_dense)
    return SoftTargets(
        ids.astype(np.int32),
        top.astype(np.float32),
        tail.astype(np.float32),
        lse_t.astype(np.float32),
        np.ones(n, np.float32),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_projection_equals_the_dense_coarsened_distribution(temperature):
    """Full support, a map with duplicates (two teacher tokens with one student counterpart) and
    unmapped tokens: the projected row equals the dense reference, tempered per module doc."""
    rng = np.random.default_rng(0)
    vt, vs, n = 12, 9, 5
    lp = np_log_softmax(rng.normal(0, 2, (n, vt)))
    tmap = np.array([0, 1, 2, 2, 3, -1, 4, 5, -1, 6, 7, 8], np.int32)  # 2 and 3 -> 2; 5 and 8 unmapped
    t = dense_targets(lp, vt, temperature)
    label = tmap[np.argmax(lp, axis=-1)]
    first = np.argmax(lp, axis=-1)
    chain = lp[np.arange(n), first]  # one teacher token per student token: its own log-prob
    out, share = xtok.project(t, tmap[t.ids], first, chain, label, temperature)
    p = np.exp(lp)
    coarse = np.zeros((n, vs))
    for v in range(vt):
        if tmap[v] >= 0:
            coarse[:, tmap[v]] += p[:, v]
    got = np.full((n, vs), 0.0)
    for r in range(n):
        for i, lp in zip(out.ids[r], out.logp[r], strict=True):
            got[r, i] += np.exp(lp) if np.isfinite(lp) else 0.0
    np.testing.assert_allclose(got, coarse, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(out.tail), p[:, [5, 8]].sum(-1), rtol=1e-5)
    np.testing.assert_allclose(share, coarse.sum(-1), rtol=1e-5)
    # tempered: each merged entry counts as one token; unmapped tokens one by one
    z = (coarse ** (1 / temperature)).sum(-1) + (p[:, [5, 8]] ** (1 / temperature)).sum(-1)
    want = np.where(coarse > 0, np.log(np.maximum(coarse, 1e-300)) / temperature - np.log(z)[:, None], -np.inf)
    lp_t = out.logp.astype(np.float64) / temperature - out.lse_t[:, None]
    for r in range(n):
        for i, lp in zip(out.ids[r], lp_t[r], strict=True):
            if np.isfinite(lp):
                assert lp == pytest.approx(want[r, i], abs=2e-5)


def test_without_duplicates_the_tempered_row_is_the_teachers_own():
    rng = np.random.default_rng(1)
    vt, n, k, temperature = 40, 6, 8, 2.0
    lp = np_log_softmax(rng.normal(0, 2, (n, vt)))
    t = dense_targets(lp, k, temperature)
    tmap = np.arange(vt, dtype=np.int32)[::-1].copy()  # a permutation: every token has one counterpart
    first = t.ids[:, 0]
    out, _ = xtok.project(t, tmap[t.ids], first, np.full(n, np.nan), tmap[first], temperature)
    np.testing.assert_array_equal(out.ids, tmap[t.ids])
    np.testing.assert_allclose(out.logp, t.logp, rtol=1e-6)
    np.testing.assert_allclose(out.lse_t, t.lse_t, rtol=1e-5)
    np.testing.assert_allclose(out.tail, t.tail, rtol=1e-5)


def test_chain_rule_moves_the_span_probability_to_the_merged_token():
    """Student token "ab" over teacher "a","b": p(ab) = p(a) p(b|a); p(a) - p(ab) stays on student "a"."""
    t = SoftTargets(
        np.array([[0, 1, 2]], np.int32),
        np.log(np.array([[0.5, 0.3, 0.1]], np.float32)),
        np.log(np.array([0.1], np.float32)),
        np.zeros(1, np.float32),
        np.ones(1, np.float32),
    )
    sid = np.array([[10, 11, -1]], np.int32)  # teacher a -> student a(10), b -> b(11), c unmapped
    chain = np.array([np.log(0.5) + np.log(0.6)])  # p(a) * p(b | a)
    out, share = xtok.project(t, sid, np.array([0]), chain, np.array([12]), 1.0)
    got = {int(i): float(np.exp(lp)) for i, lp in zip(out.ids[0], out.logp[0], strict=True) if np.isfinite(lp)}
    assert got == pytest.approx({12: 0.3, 11: 0.3, 10: 0.2})
    assert np.exp(out.tail[0]) == pytest.approx(0.2)  # 0.1 tail + 0.1 on the unmapped teacher token
    assert share[0] == pytest.approx(0.8 / 0.9)


def test_span_logp_needs_every_token_in_its_rows_support():
    t = SoftTargets(
        np.array([[3, 4], [5, 6]], np.int32),
        np.log(np.array([[0.6, 0.3], [0.5, 0.2]], np.float32)),
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        np.ones(2, np.float32),
    )
    assert xtok.span_logp(t, [3, 6], 0, 2) == pytest.approx(np.log(0.6 * 0.2), rel=1e-6)
    assert xtok.span_logp(t, [3, 7], 0, 2) is None


# ---------------------------------------------------------------- carrying targets for real tokenizations


def teacher_rows(rng, n, vocab, k):
    return dense_targets(np_log_softmax(rng.normal(0, 3, (n, vocab))), k, 2.0)


@pytest.mark.parametrize("student_name", ["llama3-800", "sp-1000"])
def test_carry_targets_on_real_tokenizations(tokenizers, student_name):
    t_hf, s_hf = tokenizers["chatml-1000"], tokenizers[student_name]
    pair = token_pair(t_hf, s_hf, [t_hf.eos_token_id], s_hf.eos_token_id, len(t_hf))
    text = "Break the migration into ordered steps: back up, convert the schema, café 日本 😀 check rows."
    t_ids = t_hf.encode(text, add_special_tokens=False) + [t_hf.eos_token_id]
    s_ids = s_hf.encode(text, add_special_tokens=False) + [s_hf.eos_token_id]
    t = teacher_rows(np.random.default_rng(2), len(t_ids), len(t_hf), 16)
    t.ids[np.arange(len(t_ids)), 0] = t_ids  # the teacher put its top token on what it said
    out, kinds, mapped = xtok.carry_targets(pair, t, t_ids, s_ids, True, "uld", 2.0)
    assert out.ids.shape == (len(s_ids), 16) and len(kinds) == len(s_ids)
    aligned = kinds >= xtok.KIND_ONE
    assert aligned[-1] and out.ids[-1, 0] == s_hf.eos_token_id  # end of turn -> end of turn, with its mass
    assert np.exp(out.logp[-1, 0]) == pytest.approx(np.exp(t.logp[-1, 0]), rel=1e-5)
    np.testing.assert_array_equal(out.kd_mask, aligned.astype(np.float32))
    np.testing.assert_array_equal(out.uld_mask, (kinds == xtok.KIND_ULD).astype(np.float32))
    assert aligned.mean() > 0.3 and (mapped[aligned] > 0).all()
    # on aligned rows the label carries the teacher's probability of what was said
    for i in np.flatnonzero(kinds == xtok.KIND_ONE)[:-1]:
        slot = np.flatnonzero(out.ids[i] == s_ids[i])
        assert slot.size == 1 and np.isfinite(out.logp[i, slot[0]])
    uld = np.flatnonzero(kinds == xtok.KIND_ULD)
    assert uld.size and all(any(np.array_equal(out.logp[i], t.logp[j]) for j in range(len(t_ids))) for i in uld)


def test_sentencepiece_first_token_maps_through_the_dummy_prefix(tokenizers):
    t_hf, s_hf = tokenizers["chatml-1000"], tokenizers["sp-1000"]
    pair = token_pair(t_hf, s_hf, [t_hf.eos_token_id], s_hf.eos_token_id, len(t_hf))
    t_ids, s_ids = t_hf.encode("the", add_special_tokens=False), s_hf.encode("the", add_special_tokens=False)
    assert s_hf.convert_ids_to_tokens(s_ids) == ["▁the"] and t_hf.convert_ids_to_tokens(t_ids) == ["the"]
    t = teacher_rows(np.random.default_rng(3), 1, len(t_hf), 8)
    t.ids[0, 0] = t_ids[0]
    out, kinds, _ = xtok.carry_targets(pair, t, t_ids, s_ids, False, "ce", 1.0)
    assert kinds.tolist() == [xtok.KIND_ONE] and out.ids[0, 0] == s_ids[0]
    others = {int(i) for i, lp in zip(out.ids[0], out.logp[0], strict=True) if np.isfinite(lp)} - {s_ids[0]}
    teacher_said = {pair.teacher.pieces[i] for i in t.ids[0]}
    assert others and all(
        pair.student.pieces[i][:1] == b" " and pair.student.pieces[i][1:] in teacher_said for i in others
    )  # "im" -> "▁im": candidates carry the dummy space too


def test_ce_mode_leaves_unaligned_positions_to_ce(tokenizers):
    t_hf, s_hf = tokenizers["chatml-1000"], tokenizers["llama3-800"]
    pair = token_pair(t_hf, s_hf, [t_hf.eos_token_id], s_hf.eos_token_id, len(t_hf))
    text = "unbelievably reorganised configurations"
    t_ids, s_ids = t_hf.encode(text, add_special_tokens=False), s_hf.encode(text, add_special_tokens=False)
    t = teacher_rows(np.random.default_rng(4), len(t_ids), len(t_hf), 8)
    out, kinds, _ = xtok.carry_targets(pair, t, t_ids, s_ids, False, "ce", 2.0)
    assert xtok.KIND_ULD not in kinds and (out.uld_mask == 0).all()
    ce = kinds == xtok.KIND_CE
    assert ce.any() and (out.kd_mask[ce] == 0).all()


# ---------------------------------------------------------------- coverage report and threshold


def test_coverage_threshold_refuses_or_warns():
    report = {"share_aligned": 0.4, "mass_mapped": 0.9}
    with pytest.raises(VocabularyMismatch, match="response positions aligned 40.0%"):
        xtok.check_coverage(report, resolve_config({"xtok_min_coverage": 0.5}))
    xtok.check_coverage(report, resolve_config({"xtok_min_coverage": 0.5, "xtok_low_coverage": "warn"}))
    xtok.check_coverage(report, resolve_config({"xtok_min_coverage": 0.3}))
    with pytest.raises(VocabularyMismatch, match="teacher mass mapped"):
        xtok.check_coverage({"share_aligned": 0.9, "mass_mapped": 0.2}, resolve_config({}))


def test_coverage_report_counts_positions():
    kinds = np.array([xtok.KIND_ONE, xtok.KIND_MERGED, xtok.KIND_ULD, xtok.KIND_CE], np.int8)
    seq = xtok.AlignedSequence(np.zeros(5, np.int32), 1, None, kinds, np.array([0.8, 0.6, 0.0, 0.0]))
    r = xtok.coverage_report([seq, seq])
    assert (r["positions"], r["one_to_one"], r["merged"], r["uld"], r["ce_only"]) == (8, 2, 2, 2, 2)
    assert r["share_aligned"] == 0.5 and r["mass_mapped"] == pytest.approx(0.7)


def test_group_aligned_property():
    assert Group((0, 1), (0, 3)).aligned and not Group((0, 2), (0, 1)).aligned and not Group((0, 1), (2, 2)).aligned
