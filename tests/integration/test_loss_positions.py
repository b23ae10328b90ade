"""Which positions train, through the real tiny models: the batch loss equals a reference summed
over each sequence alone (no padding, labels read off the unshifted tokens), and the EOS is
trained exactly when the teacher stopped or a correction was given whole."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from jobs.config import KDConfig
from kd_worker.engine import teacher as teacher_fns
from kd_worker.engine.cache import TargetCache
from kd_worker.engine.data import Example, StudentSequence, collate, render_prompt
from kd_worker.engine.distill import student_sequences
from kd_worker.engine.hooks import Hooks
from kd_worker.engine.losses import Targets, loss_sums
from kd_worker.engine.models import hidden_at, load_model_dir
from kd_worker.engine.objective import Objective, to_mx_targets
from kd_worker.engine.types import Scored
from kd_worker.engine.vocab import plan_vocabulary


@pytest.fixture(scope="module")
def models(models_root):
    teacher, student = load_model_dir(models_root / "teacher"), load_model_dir(models_root / "student")
    return teacher, student, plan_vocabulary(teacher, student, allow_cross=False)


def example(text: str, response: str | None = None) -> Example:
    return Example(key=text, prompt=({"role": "user", "content": text},), response=response, source=repr(text))


def scored_sequences(models, prompts_and_responses, top_k: int = 8, max_seq_length: int = 512):
    teacher, student, plan = models
    items = []
    for text, response in prompts_and_responses:
        ex = example(text)
        prompt = render_prompt(teacher.tokenizer, ex.prompt)
        (t,) = teacher_fns.score(teacher, [(prompt, response)], plan.n_vocab, top_k, 2.0)
        items.append(Scored(ex, list(response), t))
    return student_sequences(teacher, student, items, KDConfig(max_seq_length=max_seq_length), plan)


def reference_sums(student, objective: Objective, seqs: list[StudentSequence]) -> tuple[float, float, int]:
    """(KD sum, CE sum, tokens) from each sequence run alone: logits of the full sequence, the
    response rows picked by hand, CE in float64 numpy against the next token, KD one row at a
    time where the row's kd_mask says so."""
    kd = ce = 0.0
    n = 0
    for s in seqs:
        logits = student.model(mx.array(s.tokens[None, :-1]))[0, :, : objective.n_vocab].astype(mx.float32)
        rows = logits[s.resp_start - 1 :]  # the logit at i predicts token i + 1
        labels = s.tokens[s.resp_start :]
        z = np.array(rows, np.float64)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        ce += float((lse - z[np.arange(len(labels)), labels]).sum())
        t = s.targets
        for j in np.flatnonzero(t.kd_mask > 0):
            one = Targets(*(mx.array(a[j : j + 1]) for a in (t.ids, t.logp, t.tail, t.lse_t, labels)), mx.ones((1,)))
            kd += float(loss_sums(rows[j : j + 1], one, objective.temperature).kd.item())
        n += len(labels)
    return kd, ce, n


@pytest.mark.parametrize(("path", "pad_id"), [("autodiff", 0), ("fused", 5)])
def test_the_batch_loss_is_the_sum_over_each_response_alone(models, path, pad_id):
    teacher, student, plan = models
    seqs = scored_sequences(
        models,
        [
            ("short", [40, 41, teacher.eos_id]),
            ("a much longer question with many words", [50, 51, 52, 53]),
            ("q", [60]),
        ],
    )
    seqs[1].targets.kd_mask[1] = 0.0  # a CE-only position (cross-tokenizer runs have them)
    objective = Objective(plan.student_vocab)
    b = collate(seqs, pad_id=pad_id)
    if path == "fused":
        student.model.freeze()  # the training path: a frozen LM head gets the fused loss
    try:
        assert objective.fused_applies(student) == (path == "fused")
        h = hidden_at(student, mx.array(b.inputs), mx.array(b.positions))
        sums = objective.loss(student, h, to_mx_targets(b))[1]
    finally:
        student.model.unfreeze()
    kd, ce, kd_n, n = (float(v.item()) for v in sums[:4])
    want_kd, want_ce, want_n = reference_sums(student, objective, seqs)
    assert n == want_n == 8 and kd_n == 7
    assert ce == pytest.approx(want_ce, rel=1e-4)
    assert kd == pytest.approx(want_kd, rel=1e-4) and kd > 0


def never_eos(lm, base):
    """A sampler that cannot pick a stop token: generation ends only at its token budget."""
    stop = mx.array(sorted(lm.tokenizer.eos_token_ids))

    def sample(logprobs):
        banned = (mx.arange(logprobs.shape[-1])[None, :, None] == stop[None, None, :]).any(-1)
        return base(mx.where(banned, float("-inf"), logprobs))

    return sample


def eos_at(lm, base, n: int):
    """A sampler that stops on its n-th token."""
    calls = {"n": 0}

    def sample(logprobs):
        calls["n"] += 1
        tok = base(logprobs)
        return mx.full(tok.shape, lm.eos_id, tok.dtype) if calls["n"] >= n else tok

    return sample


def test_the_eos_trains_when_the_teacher_stopped_and_not_when_it_was_cut(models):
    teacher, student, plan = models
    prompt = render_prompt(teacher.tokenizer, example("hi").prompt)
    base = teacher_fns.make_sampler(0.8, 10, 1.0, teacher.n_tokens)
    mx.random.seed(3)
    (stopped,) = teacher_fns.generate(teacher, [prompt], [12], eos_at(teacher, base, 4), 1)
    (cut,) = teacher_fns.generate(teacher, [prompt], [6], never_eos(teacher, base), 1)
    assert len(stopped) == 4 and stopped[-1] == teacher.eos_id
    assert len(cut) == 6 and teacher.eos_id not in cut
    s_stopped, s_cut = scored_sequences(models, [("hi", stopped), ("hi", cut)])
    b = collate([s_stopped, s_cut])
    assert b.labels[:4].tolist() == stopped and b.labels[4:].tolist() == cut
    assert b.targets.kd_mask[3] == 1.0  # the stop token is a KD position too (the teacher's own row)
    assert teacher.eos_id not in b.labels[4:].tolist()


def test_a_given_correction_gets_its_eos_unless_it_is_cut(models, tmp_path):
    teacher, _, _ = models
    hooks = Hooks()
    t = teacher_fns.Teacher(teacher, TargetCache(tmp_path / "cache"))
    ex = example("fix this", response="the corrected answer, in a few words")
    (prompt,) = t.prompts([ex], 512)
    words = list(teacher.hf_tokenizer.encode(ex.response, add_special_tokens=False))
    (whole,) = t.responses([ex], [prompt], KDConfig(), hooks)
    assert whole == words + [teacher.eos_id]
    room = 4
    (cut,) = t.responses([ex], [prompt], KDConfig(max_seq_length=len(prompt) + room), hooks)
    assert cut == words[:room] and teacher.eos_id not in cut
