"""JSON that comes from outside the process (data records, job payloads and meta from Redis, files
in adapters_kd/), parsed with a nesting limit. Python's parser recurses: a line of 100,000 '['
raises RecursionError, which is no ValueError and escapes every handler written for bad JSON; and
what parses just under the interpreter's limit still breaks the next recursive step (validation,
re-serialisation). Nothing kd-daemon writes is nested more than a few levels."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class TooDeep(ValueError):
    """JSON nested deeper than allowed (a ValueError: callers that handle bad JSON handle this)."""


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of lists/dicts (a scalar is 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(data: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, refusing anything nested more than `max_depth` levels (TooDeep, a ValueError)."""
    try:
        obj = json.loads(data)
    except RecursionError as e:
        raise TooDeep(f"JSON nested too deeply to parse (the limit is {max_depth} levels)") from e
    if depth(obj, max_depth) > max_depth:
        raise TooDeep(f"JSON nested more than {max_depth} levels deep")
    return obj
