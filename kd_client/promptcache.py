"""KV caches kept between requests for prefix reuse, keyed by (neuron, adapter version, tokens).

A KV cache is a function of the weights that computed it: an entry made under one adapter
version must never serve another (vLLM #42125 and llama.cpp #26207 shipped that bug). Every
entry carries its key; `fetch` only looks at entries of the requested key, and `retain` drops
every entry of a domain's other versions as soon as a new version is installed.

Used on the server's MLX thread only (kd_client/neurons.py); not thread-safe.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

Key = tuple[str, int]  # (neuron, adapter version); the bare base is ("base", 0)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """At most `max_entries` KV caches, least recently used first out."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[Key, tuple[int, ...]], list[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, key: Key, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """(a private copy of the cache holding the longest shared prefix, the tokens still to
        process). At least the last token is always left to process: generation starts there."""
        from mlx_lm.models.cache import trim_prompt_cache

        best, best_len = None, 0
        for entry_key, entry_tokens in self._entries:
            if entry_key == key and (n := min(common_prefix(entry_tokens, tokens), len(tokens) - 1)) > best_len:
                best, best_len = (entry_key, entry_tokens), n
        if best is None:
            return None, tokens
        self._entries.move_to_end(best)
        cache = copy.deepcopy(self._entries[best])
        trim_prompt_cache(cache, len(best[1]) - best_len)
        return cache, tokens[best_len:]

    def insert(self, key: Key, tokens: list[int], cache: list[Any]) -> None:
        """Keep `cache`, which holds exactly `tokens`; entries it extends are dropped."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        if self.max_entries == 0 or not tokens or not can_trim_prompt_cache(cache):
            return
        new = tuple(tokens)
        for k, t in list(self._entries):
            if k == key and new[: len(t)] == t:
                del self._entries[(k, t)]
        self._entries[(key, new)] = cache
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def retain(self, neuron: str, version: int) -> int:
        """Drop every entry of `neuron` made under another version; returns how many went."""
        stale = [(k, t) for k, t in self._entries if k[0] == neuron and k[1] != version]
        for item in stale:
            del self._entries[item]
        return len(stale)

    def describe(self) -> list[dict[str, Any]]:
        return [{"neuron": k[0], "version": k[1], "tokens": len(t)} for k, t in self._entries]
