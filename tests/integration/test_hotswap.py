"""kd_client.hotswap + kd_client.follow on the tiny student: an in-place swap generates exactly
what a fresh mlx_lm.load with that adapter generates; a bad adapter leaves the old one serving."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from lora_fixtures import lora_shapes, lora_weights, write_adapter

from jobs import publisher
from kd_client.follow import FollowEvent, answer, follow
from kd_client.hotswap import AdapterSlot, AdapterSwapError, adapter_params

PROMPT = "How important is it to remember the user's daughter's name?"
N_TOKENS = 12


def greedy(model, tokenizer, n: int = N_TOKENS) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=n)]


def logits(model, tokenizer) -> np.ndarray:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return np.array(model(mx.array([ids]))[0, -1])


def fresh(student: Path, adapter: Path | None):
    return mlx_lm.load(str(student), adapter_path=None if adapter is None else str(adapter))


@pytest.fixture(scope="module")
def published(models_root, tmp_path_factory):
    """adapters_kd/ with memory v1, v2 (same LoRA shape) and v3 (rank 4, scale 10, 1 layer)."""
    student = models_root / "student"
    root = tmp_path_factory.mktemp("adapters_kd")
    wide, narrow = lora_shapes(student, 2, 8), lora_shapes(student, 1, 4, 10.0)
    for tag, shapes, layers, scale in ((1, wide, 2, 20.0), (2, wide, 2, 20.0), (3, narrow, 1, 10.0)):
        publisher.publish(
            root, "memory", lambda s, a=(shapes, tag, layers, scale): write_adapter(s, *a), {"tag": tag}, keep=10
        )
    return student, root, {n: root / "memory" / "versions" / f"{n:04d}" for n in (1, 2, 3)}, wide


def test_in_place_swap_equals_a_fresh_load(published):
    student, _, v, _ = published
    expected = {n: greedy(*fresh(student, v[n])) for n in (1, 2, 3)}
    assert len({tuple(t) for t in expected.values()}) == 3, "fixture adapters must change the output"
    model, tok = fresh(student, v[1])
    first, last = (model.model.layers[i].self_attn.q_proj.linear for i in (0, -1))  # the loaded base layers
    slot = AdapterSlot(model, adapter_path=v[1])

    r = slot.apply(v[2])  # same LoRA shape: only the arrays change
    assert not r.restructured and r.tensors == len(adapter_params(model))
    assert greedy(model, tok) == expected[2]
    assert np.array_equal(logits(model, tok), logits(*fresh(student, v[2])))
    assert slot.apply(v[3]).restructured  # another rank/scale/layer count: re-wrapped, base kept
    assert greedy(model, tok) == expected[3]
    assert model.model.layers[0].self_attn.q_proj is first  # v3 adapts the last layer only
    assert model.model.layers[-1].self_attn.q_proj.linear is last
    slot.revert()
    assert greedy(model, tok) == expected[2]
    assert model.model.layers[0].self_attn.q_proj.linear is first


@pytest.mark.parametrize("base", ["student", "student-4bit"])
def test_first_apply_on_a_bare_base_model(models_root, tmp_path, base):
    student = models_root / base
    shapes = lora_shapes(student)
    v1 = publisher.publish(tmp_path, "memory", lambda s: write_adapter(s, shapes, 11), {}).path
    model, tok = fresh(student, None)
    plain = greedy(model, tok)
    slot = AdapterSlot(model)
    assert slot.apply(v1).restructured
    assert greedy(model, tok) == greedy(*fresh(student, v1)) != plain


def _corrupt_copies(tmp_path: Path, good: Path, shapes) -> dict[str, Path]:
    """Versions that must not load: truncated weights, a checksum mismatch, wrong shapes/names."""
    out = {}
    for name in ("truncated", "tampered", "wrong_rank", "unknown_name"):
        d = tmp_path / name
        d.mkdir()
        for f in ("adapters.safetensors", "adapter_config.json", "manifest.json"):
            (d / f).write_bytes((good / f).read_bytes())
        out[name] = d
    (out["truncated"] / "manifest.json").unlink()
    data = (out["truncated"] / "adapters.safetensors").read_bytes()
    (out["truncated"] / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    cfg = json.loads((good / "adapter_config.json").read_text())
    (out["tampered"] / "adapter_config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    from safetensors.numpy import save_file

    small = {k: v[:, :4] if k.endswith("lora_a") else v[:4] for k, v in lora_weights(shapes, 5).items()}
    save_file(small, str(out["wrong_rank"] / "adapters.safetensors"))
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in lora_weights(shapes, 5).items()}
    save_file(renamed, str(out["unknown_name"] / "adapters.safetensors"))
    (out["unknown_name"] / "adapter_config.json").write_text(
        json.dumps({**cfg, "lora_parameters": {**cfg["lora_parameters"], "scale": 5.0}})
    )  # forces a re-wrap
    for name in ("wrong_rank", "unknown_name"):
        (out[name] / "manifest.json").unlink()
    return out


@pytest.mark.parametrize("bad", ["truncated", "tampered", "wrong_rank", "unknown_name"])
def test_a_bad_adapter_is_refused_and_the_previous_one_keeps_serving(published, tmp_path, bad):
    student, _, v, shapes = published
    model, tok = fresh(student, v[1])
    slot = AdapterSlot(model, adapter_path=v[1])
    before = {k: np.array(a) for k, a in adapter_params(model).items()}
    with pytest.raises(AdapterSwapError):
        slot.apply(_corrupt_copies(tmp_path, v[1], shapes)[bad])
    after = adapter_params(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], np.array(after[k])) for k in before)
    assert greedy(model, tok) == greedy(*fresh(student, v[1]))
    assert slot.current.path == v[1]
    slot.apply(v[2])  # and it still swaps afterwards
    assert greedy(model, tok) == greedy(*fresh(student, v[2]))


def test_follow_swaps_and_answers_after_each_publish(published, tmp_path):
    student, _, _, shapes = published
    root = tmp_path / "adapters_kd"
    publisher.publish(root, "memory", lambda s: write_adapter(s, shapes, 21), {})
    events: list[FollowEvent] = []

    def on_event(event: FollowEvent) -> None:  # runs on the follow thread: publish the next step
        events.append(event)
        if len(events) == 1:
            publisher.publish(root, "memory", lambda s: write_adapter(s, shapes, 22), {})
        elif len(events) == 2:  # checksums fine, contents not an adapter: must not be applied
            publisher.publish(
                root,
                "memory",
                lambda s: [(s / f).write_bytes(b"junk") for f in ("adapters.safetensors", "adapter_config.json")],
                {},
            )

    handled = follow(
        root, "memory", student, PROMPT, max_tokens=8, on_event=on_event, max_swaps=3, stop_event=threading.Event()
    )
    assert handled == 3 and [e.version for e in events] == [1, 2, 3]
    for e in events[:2]:
        assert e.error is None and e.answer == answer(*fresh(student, e.path), PROMPT, 8)
        assert e.load_s > 0 and e.swap_s > 0
    assert events[0].answer != events[1].answer
    assert events[2].answer is None and "adapter_config.json" in events[2].error
