"""The pure parts of `kd-client serve`: scheduling, stop strings, the version-keyed prompt cache,
the binding rule."""

from __future__ import annotations

from collections import deque

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from jobs.errors import ConfigError
from kd_client.promptcache import PromptCache
from kd_client.serve import check_binding, is_loopback
from kd_client.servejobs import Job, StopText, choose


def job(neuron: str) -> Job:
    return Job(neuron=neuron, max_tokens=1, emit=lambda e: None)


def test_the_installed_domain_goes_first_but_never_forever():
    a1, b1, a2, b2, a3 = job("a"), job("b"), job("a"), job("b"), job("a")
    jobs = deque([a1, b1, a2, b2, a3])
    assert choose(jobs, "b", max_skips=2) is b1  # a1 passed over once
    assert choose(jobs, "b", max_skips=2) is b2  # a1 passed over twice (and a2 once)
    jobs.append(b3 := job("b"))
    assert choose(jobs, "b", max_skips=2) is a1  # the oldest has waited long enough
    assert choose(jobs, "a", max_skips=2) is a2
    a3.cancelled.set()
    assert choose(jobs, "a", max_skips=2) is b3  # a cancelled job is dropped, not served
    assert choose(jobs, "a", max_skips=2) is None and not jobs


@pytest.mark.parametrize(
    "pieces,stops,text,hit",
    [
        (["Hello wor", "ld. Bye"], ("world",), "Hello ", True),
        (["ab", "c", "d"], ("cd", "bx"), "ab", True),
        (["a<", "/s", ">b"], ("</s>",), "a", True),
        (["a<", "b"], ("</s>",), "a<b", False),
        (["no stop here"], (), "no stop here", False),
    ],
)
def test_stop_strings_over_streamed_text(pieces, stops, text, hit):
    stop, out = StopText(stops), ""
    for p in pieces:
        out += stop.feed(p)
        if stop.hit:
            break
    if not stop.hit:
        out += stop.flush()
    assert (out, stop.hit) == (text, hit)


def kv(tokens: list[int]) -> list[KVCache]:
    c = KVCache()
    x = mx.array([float(t) for t in tokens]).reshape(1, 1, len(tokens), 1)
    c.update_and_fetch(x, x)
    return [c]


def test_prompt_cache_entries_never_cross_neurons_or_versions():
    cache = PromptCache(max_entries=4)
    cache.insert(("memory", 1), [1, 2, 3, 4], kv([1, 2, 3, 4]))
    assert cache.fetch(("memory", 2), [1, 2, 3, 4, 5]) == (None, [1, 2, 3, 4, 5])
    assert cache.fetch(("code", 1), [1, 2, 3, 4, 5]) == (None, [1, 2, 3, 4, 5])
    hit, rest = cache.fetch(("memory", 1), [1, 2, 3, 9])
    assert rest == [9] and hit is not None and hit[0].offset == 3
    assert mx.array_equal(hit[0].state[0][..., :3, :], mx.array([1.0, 2, 3]).reshape(1, 1, 3, 1))
    same, rest = cache.fetch(("memory", 1), [1, 2, 3, 4])  # the last token is always recomputed
    assert rest == [4] and same is not None and same[0].offset == 3
    cache.insert(("memory", 1), [1, 2, 3, 4, 5, 6], kv([1, 2, 3, 4, 5, 6]))  # extends the first entry
    cache.insert(("code", 1), [7, 8], kv([7, 8]))
    assert [(e["neuron"], e["version"], e["tokens"]) for e in cache.describe()] == [("memory", 1, 6), ("code", 1, 2)]
    assert cache.retain("memory", 2) == 1
    assert cache.describe() == [{"neuron": "code", "version": 1, "tokens": 2}]


def test_binding_beyond_loopback_needs_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "k")
    with pytest.raises(ConfigError, match="KD_SERVE_API_KEY"):
        check_binding("0.0.0.0", None)
