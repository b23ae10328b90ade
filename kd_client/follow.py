"""The reference consumer of published adapters (`kd-client follow`): the whole cortex loop.

    load the base once -> watch adapters_kd/{domain} -> on each new version: swap the LoRA
    weights in place (kd_client/hotswap.py) -> answer a prompt -> report

The watcher thread only signals; loading, swapping and generating stay on the caller's thread.
mlx is imported lazily (and by hotswap.py), so importing this module needs no MLX.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from jobs import publisher
from jobs.errors import ModelError
from kd_client.hotswap import AdapterSlot, AdapterSwapError
from kd_client.watcher import AdapterUpdate, AdapterWatcher

if TYPE_CHECKING:
    from kd_client.mirror import Mirror

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FollowEvent:
    domain: str
    version: int
    path: Path
    swap_s: float  # the in-place swap (checksums + read + install)
    load_s: float  # the one full model load at start, for comparison
    answer: str | None  # None when the swap failed and the previous adapter stayed
    error: str | None = None


def load_base(model_dir: Path) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds): the student base, loaded once."""
    import mlx_lm

    t0 = time.perf_counter()
    try:
        model, tokenizer = mlx_lm.load(str(model_dir))[:2]  # typed as a pair or, with return_config, a triple
    except Exception as e:  # third-party loaders raise many types; say which directory failed
        raise ModelError(f"cannot load model {model_dir}: {type(e).__name__}: {e}") from e
    return model, tokenizer, time.perf_counter() - t0


def answer(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> str:
    """A greedy (deterministic) answer, through the chat template when the tokenizer has one."""
    import mlx_lm

    ids = (
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if getattr(tokenizer, "chat_template", None)
        else tokenizer.encode(prompt)
    )
    return mlx_lm.generate(model, tokenizer, ids, max_tokens=max_tokens)


def swap_and_answer(
    slot: AdapterSlot, tokenizer: Any, update: AdapterUpdate, prompt: str, max_tokens: int, load_s: float
) -> FollowEvent:
    """One step of the loop; a version that fails to apply is reported and the old one keeps serving."""
    try:
        swap = slot.apply(update.path)
    except AdapterSwapError as e:
        log.warning("follow_swap_failed", domain=update.domain, version=update.version, error=str(e))
        return FollowEvent(update.domain, update.version, update.path, 0.0, load_s, None, str(e))
    text = answer(slot.model, tokenizer, prompt, max_tokens)
    return FollowEvent(update.domain, update.version, update.path, swap.seconds, load_s, text)


def follow(
    adapters_dir: Path,
    domain: str,
    model_dir: Path,
    prompt: str,
    *,
    max_tokens: int = 64,
    force_polling: bool | None = None,
    stop_event: threading.Event | None = None,
    on_event: Callable[[FollowEvent], None] | None = None,
    max_swaps: int | None = None,
    wait_s: float = 0.5,
    mirror: Mirror | None = None,
) -> int:
    """Hold `model_dir` loaded and follow `domain`'s published adapter until `stop_event` is set
    (or `max_swaps` versions were handled); returns the number of versions handled. The current
    version, if any, is the first event. With a `mirror`, versions come from Redis (kd_client/mirror.py)."""
    publisher.domain_dir(Path(adapters_dir), domain)  # SecurityError for a bad name, before the load
    stop = stop_event or threading.Event()
    model, tokenizer, load_s = load_base(Path(model_dir))
    log.info("follow_started", domain=domain, model=str(model_dir), load_s=load_s)
    slot, handled = AdapterSlot(model), 0
    with AdapterWatcher(adapters_dir, [domain], force_polling=force_polling, mirror=mirror) as watcher:
        while not stop.is_set() and (max_swaps is None or handled < max_swaps):
            for update in watcher.take(wait_s):
                event = swap_and_answer(slot, tokenizer, update, prompt, max_tokens, load_s)
                handled += 1
                if on_event is not None:
                    on_event(event)
    return handled


def describe(event: FollowEvent) -> str:
    """One line per event for a terminal."""
    head = f"{event.domain} v{event.version}"
    if event.error is not None:
        return f"{head}: not applied, the previous adapter keeps serving ({event.error})"
    ratio = f", {event.swap_s / event.load_s:.1%} of the full load" if event.load_s > 0 else ""
    return f"{head}: swapped in {event.swap_s * 1000:.1f} ms{ratio}\n{event.answer}"
