"""Cross-tokenizer distillation: teacher targets carried over to a student with another tokenizer.

The teacher generates and scores with its own tokenizer and template (kd_worker.engine.teacher); here,
after scoring, the response is re-rendered for the student:

  teacher response ids -> bytes (byte-level / sentencepiece markers undone) -> text
  text -> the student's own tokens, after the student's own chat template
  both token lists -> byte spans -> groups of tokens that cover the same bytes (`align`)
  1 student token : 1..m teacher tokens  -> the teacher distribution at the first teacher token,
                                            mapped id by id onto student ids (`project`)
  anything else (the student splits a teacher token, spans disagree) -> ULD or CE only

Mapping: a teacher token maps to the student token that stands for exactly the same bytes
(kd_worker.engine.tokmap); the end-of-turn tokens map by role. Teacher mass on tokens without a
counterpart goes into the tail bucket. When one student token covers teacher tokens t1..tm,
its probability is the chain rule over the span, p(t1) p(t2|t1) ... p(tm|...), as in TRL's GOLD
trainer; unlike GOLD, which scales the whole first-position distribution by the product
(unnormalised), only t1's own mass is split: the chain goes to the student token, the rest
stays on t1's counterpart, so every row stays a distribution. Exact strings only: MinED's
edit-distance matches would put teacher mass on tokens that spell something else.

Unaligned positions get ULD (Boizard et al. 2024; losses.uld_distance: sorted-probability L1,
no ids compared) against the teacher row whose token holds the student token's first byte, or
CE only (`xtok_unaligned`). CE on the student's own tokens applies everywhere.

Tempering: a projected row is tempered as if each of its entries were one teacher token:
p_T(e) = P(e)^(1/T) / Z', with Z' summed over the same events (unmapped tokens one by one, the
teacher's own tail contribution as scored). Where every entry has exactly one teacher token
behind it, Z' = Z and the row equals the teacher's exact tempered distribution; merged entries
(a chain, two teacher tokens with the same bytes) are tempered as single tokens. Stored as
`lse_t` = log Z', so the loss code needs no cross-tokenizer branch.

Only numpy here; no mlx.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog

from jobs.errors import DataError, VocabularyMismatch
from kd_worker.engine.data import FIELDS, SoftTargets, StudentSequence, render_prompt
from kd_worker.engine.tokmap import TokenPair, pair_for

if TYPE_CHECKING:
    from jobs.config import KDConfig
    from kd_worker.engine.models import LoadedModel
    from kd_worker.engine.types import Scored
    from kd_worker.engine.vocab import VocabPlan

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------- alignment (pure)


@dataclass(frozen=True)
class Group:
    student: tuple[int, int]  # [start, stop) student token indices
    teacher: tuple[int, int]  # [start, stop) teacher token indices; empty: no counterpart

    @property
    def aligned(self) -> bool:
        """One student token over one or more teacher tokens: a teacher distribution applies."""
        return self.student[1] - self.student[0] == 1 and self.teacher[1] > self.teacher[0]


def spans_of(pieces: Sequence[bytes | None]) -> np.ndarray:
    """[n, 2] byte (start, end) of each token in the concatenated text; special tokens are empty."""
    lengths = np.array([0 if p is None else len(p) for p in pieces], np.int64)
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1).reshape(-1, 2)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def student_spans(pieces: Sequence[bytes | None], text: bytes) -> tuple[np.ndarray, int, bool]:
    """(spans in `text`, bytes both sides agree on, dummy prefix?). Sentencepiece prepends a space
    that is no byte of the text: it is cut from the first token instead of shifting every span."""
    spans = spans_of(pieces)
    joined = b"".join(p for p in pieces if p)
    plain = _common_prefix(joined, text)
    if joined[:1] == b" " and (shifted := _common_prefix(joined[1:], text)) > plain:
        return np.maximum(spans - 1, 0), shifted, True
    return spans, plain, False


def align(s_spans: np.ndarray, t_spans: np.ndarray, limit: int | None = None) -> list[Group]:
    """Cut both token lists at every byte offset where both have a boundary; each student token
    lands in exactly one group. Tokens past `limit` (where the texts differ) and zero-width
    tokens (BOS, specials) get a group with no teacher side."""
    if limit is None:
        limit = int(max(s_spans[-1, 1] if len(s_spans) else 0, t_spans[-1, 1] if len(t_spans) else 0))
    ns, nt = int(np.sum(s_spans[:, 1] <= limit)), int(np.sum(t_spans[:, 1] <= limit))
    groups: list[Group] = []
    i = j = 0
    while i < ns:
        s0, s1 = s_spans[i]
        while s1 > s0 and j < nt and t_spans[j, 1] <= s0:
            j += 1  # teacher tokens left behind: zero-width specials, or the rest of a failed group
        if s1 == s0 or j >= nt or t_spans[j, 0] != s0:
            groups.append(Group((i, i + 1), (j, j)))
            i += 1
            continue
        ii, jj, se, te = i + 1, j + 1, s1, t_spans[j, 1]
        while se != te and ((se < te and ii < ns) or (te < se and jj < nt)):
            if se < te:
                se, ii = s_spans[ii, 1], ii + 1
            else:
                te, jj = t_spans[jj, 1], jj + 1
        if se != te:
            groups.extend(Group((k, k + 1), (jj, jj)) for k in range(i, ii))
        else:
            groups.append(Group((i, ii), (j, jj)))
        i, j = ii, jj
    groups.extend(Group((k, k + 1), (nt, nt)) for k in range(ns, len(s_spans)))
    return groups


def teacher_text(pieces: Sequence[bytes | None]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(UTF-8 text for the student, teacher token spans in it [n, 2], tokens holding invalid bytes [n]).
    Invalid bytes (a character cut by truncation, a weak model's stray byte tokens) cannot be
    given to the student's tokenizer: they are dropped, and the tokens holding them never align."""
    data = b"".join(p for p in pieces if p)
    valid = np.ones(len(data), bool)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pos = 0
        for ch in data.decode("utf-8", errors="surrogateescape"):
            stray = "\udc80" <= ch <= "\udcff"  # one undecodable byte
            valid[pos] = not stray
            pos += 1 if stray else len(ch.encode())
    raw = spans_of(pieces)
    kept, dropped = np.concatenate([[0], np.cumsum(valid)]), np.concatenate([[0], np.cumsum(~valid)])
    bad = dropped[raw[:, 1]] > dropped[raw[:, 0]]
    return np.frombuffer(data, np.uint8)[valid].tobytes(), kept[raw], bad


def anchor(t_spans: np.ndarray, start: int) -> int | None:
    """The teacher token whose bytes contain `start` (its row feeds ULD at an unaligned position)."""
    j = int(np.searchsorted(t_spans[:, 1], start, side="right"))
    return j if j < len(t_spans) and t_spans[j, 0] <= start else None


# ---------------------------------------------------------------- projection (vectorized numpy)

KIND_CE, KIND_ULD, KIND_ONE, KIND_MERGED = 0, 1, 2, 3  # >= KIND_ONE: aligned
TAIL_FLOOR = 1e-20  # a projected support never covers the student's whole vocabulary


def _merge(sid: np.ndarray, p: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, ...]:
    """Sum duplicate student ids per row, sort by mass, keep k slots. Returns ids [R, k], log-probs
    [R, k], kept mass [R], mass beyond k [R] and the sum of mass^(1/T) over all merged entries [R]."""
    rows_n = sid.shape[0]
    live = (sid >= 0) & (p > 0)
    rows = np.broadcast_to(np.arange(rows_n)[:, None], sid.shape)[live]
    span = int(sid.max()) + 1 if live.any() else 1
    keys, inv = np.unique(rows.astype(np.int64) * span + sid[live], return_inverse=True)
    mass = np.bincount(inv.ravel(), weights=p[live])
    r, s = keys // span, keys % span
    order = np.lexsort((-mass, r))
    r, s, mass = r[order], s[order], mass[order]
    col = np.arange(len(r)) - np.searchsorted(r, r)  # rank within its row
    keep = col < k
    ids = np.zeros((rows_n, k), np.int32)
    logp = np.full((rows_n, k), -np.inf)
    ids[r[keep], col[keep]] = s[keep]
    logp[r[keep], col[keep]] = np.log(mass[keep])
    kept = np.bincount(r[keep], weights=mass[keep], minlength=rows_n)
    beyond = np.bincount(r[~keep], weights=mass[~keep], minlength=rows_n)
    z = np.bincount(r, weights=mass ** (1.0 / temperature), minlength=rows_n)
    return ids, logp, kept, beyond, z


def project(
    t: SoftTargets, sid: np.ndarray, first: np.ndarray, chain: np.ndarray, label: np.ndarray, temperature: float
) -> tuple[SoftTargets, np.ndarray]:
    """Teacher rows [R, K] -> student rows [R, K], and the share of each row's support mass mapped.

    sid [R, K] is the student id of each teacher slot (-1: none). In each row the student token
    `label` covers teacher tokens starting with `first`, of joint log-prob `chain` (NaN: unknown);
    that much of `first`'s mass moves to `label` (chain rule), the rest stays where it maps."""
    n, k = t.ids.shape
    p = np.exp(t.logp.astype(np.float64))  # 0 on padding slots
    slot = (t.ids == first[:, None]) & (p > 0)
    moved = np.where(slot.any(axis=1) & np.isfinite(chain), np.exp(np.where(np.isfinite(chain), chain, -np.inf)), 0.0)
    sid_x = np.concatenate([sid, label[:, None]], axis=1)
    p_x = np.concatenate([np.maximum(p - slot * moved[:, None], 0.0), moved[:, None]], axis=1)
    ids, logp, kept, beyond, z = _merge(sid_x, p_x, k, temperature)
    unmapped = np.where(sid_x < 0, p_x, 0.0)
    tail = np.exp(t.tail.astype(np.float64)) + unmapped.sum(axis=1) + beyond
    if temperature == 1.0:
        lse = np.zeros(n)
    else:  # Z' over the same events as the teacher's Z, merged entries counted once (module doc)
        own_tail = np.exp(t.lse_t.astype(np.float64)) - (p ** (1.0 / temperature)).sum(axis=1)
        own_tail = np.where(np.isneginf(t.tail), 0.0, np.maximum(own_tail, 0.0))
        lse = np.log(z + (unmapped ** (1.0 / temperature)).sum(axis=1) + own_tail)
    out = SoftTargets(
        ids,
        logp.astype(np.float32),
        np.log(np.maximum(tail, TAIL_FLOOR)).astype(np.float32),
        lse.astype(np.float32),
        np.ones(n, np.float32),
        np.zeros(n, np.float32),
    )
    return out, kept / np.maximum(p.sum(axis=1), 1e-30)


def span_logp(t: SoftTargets, t_ids: Sequence[int], j0: int, j1: int) -> float | None:
    """log p(t_j0) + ... + log p(t_j1-1) teacher-forced; None when a token is outside its row's support."""
    total = 0.0
    for j in range(j0, j1):
        hit = np.flatnonzero((t.ids[j] == t_ids[j]) & np.isfinite(t.logp[j]))
        if hit.size == 0:
            return None
        total += float(t.logp[j, hit[0]])
    return total


# ---------------------------------------------------------------- student sequences


@dataclass
class AlignedSequence(StudentSequence):
    """A student sequence built across tokenizers; `kinds`/`mapped` per response position feed the report."""

    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # KIND_* per response token
    mapped: np.ndarray = field(default_factory=lambda: np.zeros(0))  # share of teacher support mass mapped


Row = tuple[int, int, float, bool]  # (student position, teacher position, chain log-prob or NaN, merged span?)


def _plan_rows(
    groups: list[Group],
    t: SoftTargets,
    t_ids: Sequence[int],
    t_spans: np.ndarray,
    t_bad: np.ndarray,
    s_spans: np.ndarray,
) -> tuple[list[Row], list[tuple[int, int | None]]]:
    """(aligned rows, other student positions with their ULD anchor). A merged span whose chain is
    unknown (a token outside the top-k) is not aligned."""
    aligned: list[Row] = []
    other: list[tuple[int, int | None]] = []
    for g in groups:
        (i0, i1), (j0, j1) = g.student, g.teacher
        ok = g.aligned and not t_bad[j0:j1].any()
        chain = span_logp(t, t_ids, j0, j1) if ok else None
        if ok and (chain is not None or j1 - j0 == 1):
            aligned.append((i0, j0, np.nan if chain is None else chain, j1 - j0 > 1))
            continue
        for i in range(i0, i1):
            start, end = s_spans[i] if i < len(s_spans) else (0, 0)
            other.append((i, anchor(t_spans, int(start)) if end > start else None))
    return aligned, other


def _project_rows(
    pair: TokenPair,
    t: SoftTargets,
    t_ids: Sequence[int],
    s_ids: Sequence[int],
    aligned: list[Row],
    phantom: bool,
    temperature: float,
) -> tuple[np.ndarray, SoftTargets, np.ndarray, np.ndarray]:
    """(student positions, their projected rows, mapped share, merged span?) for the aligned rows."""
    si, tj = np.array([a[0] for a in aligned]), np.array([a[1] for a in aligned])
    sid = pair.map_ids(t.ids[tj])
    if phantom and si[0] == 0:  # the student's first token carries the dummy-prefix space
        sid[0] = pair.map_ids(t.ids[tj[0]], prefix=b" ")
    rows = SoftTargets(t.ids[tj], t.logp[tj], t.tail[tj], t.lse_t[tj], t.kd_mask[tj])
    chain = np.array([a[2] for a in aligned], np.float64)
    proj, share = project(rows, sid, np.asarray(t_ids)[tj], chain, np.asarray(s_ids)[si], temperature)
    return si, proj, share, np.array([a[3] for a in aligned])


def carry_targets(
    pair: TokenPair,
    t: SoftTargets,
    t_ids: Sequence[int],
    s_ids: Sequence[int],
    stopped: bool,
    unaligned: Literal["ce", "uld"],
    temperature: float,
) -> tuple[SoftTargets, np.ndarray, np.ndarray]:
    """Student-side targets [len(s_ids), K] from the teacher's [len(t_ids), K] over the same text
    (with `stopped`, both lists end with their end-of-turn token), the KIND_* of each position
    and the share of teacher support mass mapped there."""
    body_t, body_s = (t_ids[:-1], s_ids[:-1]) if stopped else (t_ids, s_ids)
    text, t_spans, t_bad = teacher_text([pair.teacher_piece(i) for i in body_t])
    s_spans, limit, phantom = student_spans([pair.student.pieces[i] for i in body_s], text)
    groups = align(s_spans, t_spans, limit)
    if stopped:
        groups.append(Group((len(body_s), len(s_ids)), (len(body_t), len(t_ids))))
        t_bad = np.append(t_bad, False)
    aligned, other = _plan_rows(groups, t, t_ids, t_spans, t_bad, s_spans)
    n, k = len(s_ids), t.ids.shape[1]
    uld_mask = np.zeros(n, np.float32)
    out = SoftTargets(
        np.zeros((n, k), np.int32),
        np.full((n, k), -np.inf, np.float32),
        np.full(n, -np.inf, np.float32),
        np.zeros(n, np.float32),
        np.zeros(n, np.float32),
        uld_mask,
    )
    out.logp[:, 0] = 0.0  # CE-only rows: a harmless one-slot distribution, masked out of the KD term
    kinds, mapped = np.full(n, KIND_CE, np.int8), np.zeros(n)
    if aligned:
        si, proj, share, merged = _project_rows(pair, t, t_ids, s_ids, aligned, phantom, temperature)
        ok = share > 0  # nothing mapped: no distribution to carry over
        for f in FIELDS:
            getattr(out, f)[si[ok]] = getattr(proj, f)[ok]
        kinds[si[ok]] = np.where(merged[ok], KIND_MERGED, KIND_ONE)
        mapped[si[ok]] = share[ok]
        other += [(int(i), anchor(t_spans, int(s_spans[i, 0])) if i < len(s_spans) else None) for i in si[~ok]]
    if unaligned == "uld":
        for i, j in other:
            if j is not None:
                out.logp[i], out.tail[i], out.lse_t[i], uld_mask[i] = t.logp[j], t.tail[j], t.lse_t[j], 1.0
                kinds[i] = KIND_ULD
    return out, kinds, mapped


def student_sequence(pair: TokenPair, student: LoadedModel, s: Scored, cfg: KDConfig) -> AlignedSequence:
    """The conversation in the student's template and tokens, with the teacher's targets carried over."""
    t_ids = [int(i) for i in s.response_ids]
    stopped = bool(t_ids) and t_ids[-1] in pair.teacher_eos
    text = teacher_text([pair.teacher_piece(i) for i in (t_ids[:-1] if stopped else t_ids)])[0]
    s_ids = list(student.hf_tokenizer.encode(text.decode("utf-8"), add_special_tokens=False))
    s_ids += [pair.student_eos] if stopped else []
    prompt = render_prompt(student.tokenizer, s.example.prompt)
    n = min(len(s_ids), cfg.max_seq_length - len(prompt))
    if n < 1:
        raise DataError(f"{s.example.source}: no room for a response within max_seq_length={cfg.max_seq_length}")
    t, kinds, mapped = carry_targets(pair, s.targets, t_ids, s_ids, stopped, cfg.xtok_unaligned, cfg.temperature)
    t = t.head(n)
    return AlignedSequence(np.asarray(prompt + s_ids[:n], np.int32), len(prompt), t, kinds[:n], mapped[:n])


def student_sequences(
    teacher: LoadedModel, student: LoadedModel, scored: Sequence[Scored], cfg: KDConfig, plan: VocabPlan
) -> list[StudentSequence]:
    """Cross-tokenizer counterpart of distill.student_sequences; refuses (or warns) below xtok_min_coverage."""
    pair = pair_for(teacher, student)
    seqs = [student_sequence(pair, student, s, cfg) for s in scored]
    for s in seqs:
        if s.tokens.max() >= plan.student_tokens or s.targets.ids.max() >= plan.student_tokens:
            raise VocabularyMismatch(f"a student token id is outside the student's vocabulary of {plan.student_tokens}")
    report = coverage_report(seqs)
    log.info("xtok_alignment", teacher_tokens_mapped=float(np.mean(pair.tmap[: plan.teacher_tokens] >= 0)), **report)
    check_coverage(report, cfg)
    return list(seqs)


def coverage_report(seqs: Sequence[StudentSequence]) -> dict[str, Any]:
    """Share of student response positions aligned and of teacher (support) mass mapped there."""
    kinds = np.concatenate([getattr(s, "kinds", np.zeros(0, np.int8)) for s in seqs] or [np.zeros(0, np.int8)])
    mapped = np.concatenate([getattr(s, "mapped", np.zeros(0)) for s in seqs] or [np.zeros(0)])
    counts = {
        name: int(np.sum(kinds == code))
        for name, code in (("one_to_one", KIND_ONE), ("merged", KIND_MERGED), ("uld", KIND_ULD), ("ce_only", KIND_CE))
    }
    aligned = counts["one_to_one"] + counts["merged"]
    return {
        "positions": int(kinds.size),
        **counts,
        "aligned": aligned,
        "share_aligned": aligned / max(kinds.size, 1),
        "mass_mapped": float(mapped[kinds >= KIND_ONE].sum() / max(aligned, 1)) if aligned else 0.0,
    }


def check_coverage(report: dict[str, Any], cfg: KDConfig) -> None:
    low = [
        f"{name} {report[key]:.1%}"
        for key, name in (("share_aligned", "response positions aligned"), ("mass_mapped", "teacher mass mapped"))
        if report[key] < cfg.xtok_min_coverage
    ]
    if not low:
        return
    msg = (
        f"cross-tokenizer coverage below xtok_min_coverage={cfg.xtok_min_coverage}: {', '.join(low)}. "
        "The student's tokenizer splits the teacher's text too differently for token-level KD; use a student "
        "whose tokenizer is closer to the teacher's, lower xtok_min_coverage, or set xtok_low_coverage=warn"
    )
    if cfg.xtok_low_coverage == "warn":
        log.warning("xtok_low_coverage", **{k: report[k] for k in ("share_aligned", "mass_mapped")})
        return
    raise VocabularyMismatch(msg)


def text_coverage(pair: TokenPair, teacher_hf: Any, student_hf: Any, texts: Sequence[str]) -> dict[str, float]:
    """Alignment of two tokenizations of plain texts, no model needed: the share of student tokens
    that align (1 student token : 1..m teacher tokens) and of the teacher's own tokens that have an
    exact counterpart (the mapped mass of a teacher sure of each token)."""
    n = aligned = merged = t_n = t_mapped = 0
    for text in texts:
        t_ids = list(teacher_hf.encode(text, add_special_tokens=False))
        s_ids = list(student_hf.encode(text, add_special_tokens=False))
        data, t_spans, t_bad = teacher_text([pair.teacher_piece(i) for i in t_ids])
        s_spans, limit, _ = student_spans([pair.student.pieces[i] for i in s_ids], data)
        for g in align(s_spans, t_spans, limit):
            if g.aligned and not t_bad[g.teacher[0] : g.teacher[1]].any():
                aligned += 1
                merged += g.teacher[1] - g.teacher[0] > 1
        n, t_n, t_mapped = n + len(s_ids), t_n + len(t_ids), t_mapped + int(np.sum(pair.tmap[t_ids] >= 0))
    return {
        "student_tokens": n,
        "teacher_tokens": t_n,
        "share_aligned": aligned / max(n, 1),
        "merged": merged / max(n, 1),
        "teacher_tokens_mapped": t_mapped / max(t_n, 1),
        "vocab_mapped": float(np.mean(pair.tmap[: len(pair.teacher.pieces)] >= 0)),
    }
