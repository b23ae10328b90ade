"""The model side of `kd-client serve`: one resident student base, every domain's adapter.

    HTTP handlers --submit(job)--> JobQueue --pop--> MLX thread: switch adapter, generate --emit--> handler
    AdapterWatcher thread --on_change--> wake the MLX thread, which installs between generations

All MLX work runs on one thread (MLX is not thread-safe): it loads the base, reads and installs
adapters (kd_client/hotswap.py, in place), and runs mlx-lm's own `stream_generate`. A generation
runs to its end on the adapter it started with: a newly published version is read, checked and
installed only between generations, so a stream never changes version midway. Each domain's
adapter stays in memory once read, so switching domains is an in-place array swap (no disk).

Scheduling (kd_client/servejobs.py): the oldest waiting request goes first, except that requests
for the domain already installed may pass it, at most `max_skips` times (a switch is cheap but
not free; see bench/serve.py). mlx is imported lazily, on the MLX thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from redis import RedisError

from jobs import publisher
from jobs.errors import KDError, ModelError
from kd_client.hotswap import Adapter, AdapterSlot, AdapterSwapError, read_adapter
from kd_client.promptcache import PromptCache
from kd_client.servejobs import (
    Active,
    Chunk,
    Failed,
    Finished,
    Job,
    JobQueue,
    ServeError,
    Started,
    StopText,
    UnknownNeuron,
)
from kd_client.watcher import AdapterUpdate, AdapterWatcher, WatcherFailed

if TYPE_CHECKING:
    from kd_client.mirror import Mirror

log = structlog.get_logger(__name__)

BASE = "base"  # the neuron without an adapter


@dataclass(frozen=True)
class Served:
    """A domain's installed version (adapter arrays in memory)."""

    version: int
    path: Path
    adapter: Adapter = field(repr=False)
    installed_at: float


# --- the resident model ----------------------------------------------------------------------------
class Neurons:
    """One base model on one MLX thread, the published adapters of `adapters_dir`, a job queue."""

    def __init__(
        self,
        model_dir: Path,
        adapters_dir: Path,
        *,
        max_queued: int = 64,
        max_skips: int = 4,
        max_prompt_tokens: int = 8192,
        cache_entries: int = 8,
        debounce_ms: int = 200,
        force_polling: bool | None = None,
        mirror: Mirror | None = None,
    ):
        self.model_dir, self.adapters_dir = Path(model_dir), Path(adapters_dir)
        self.max_prompt_tokens = max_prompt_tokens
        self.queue = JobQueue(max_queued, max_skips)
        self.cache = PromptCache(cache_entries)
        self.mirror = mirror  # KD_ADAPTERS_SOURCE=redis: the watcher mirrors Redis into adapters_dir
        self.watcher = AdapterWatcher(
            self.adapters_dir,
            on_change=self._observed,
            debounce_ms=debounce_ms,
            force_polling=force_polling,
            mirror=mirror,
        )
        self.served: dict[str, Served] = {}  # replaced whole by the MLX thread, read by the handlers
        self.refused: dict[str, dict[str, Any]] = {}  # domain -> {version, error} of the last refused version
        self.observed: dict[str, int] = {}  # domain -> newest version the watcher reported
        self.active: Active | None = None
        self.cache_view: tuple[dict[str, Any], ...] = ()
        self.switches, self.switch_s = 0, 0.0
        self.error: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._slot: AdapterSlot | None = None
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="kd-serve-mlx", daemon=True)

    # -- lifecycle (any thread) ---------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> Neurons:
        """Load the base and the published adapters; returns once requests can be served."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ModelError(f"loading {self.model_dir} took over {timeout:.0f}s")
        if self.error is not None:
            self.stop()
            raise ModelError(self.error)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.queue.wake()
        self.watcher.stop()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, job: Job) -> None:
        """Queue a job (UnknownNeuron, Busy); its events arrive through `job.emit`."""
        if job.neuron != BASE and job.neuron not in self.served:
            known = ", ".join([BASE, *sorted(self.served)])
            refused = self.refusals().get(job.neuron)
            why = f" (its version {refused['version']} was refused: {refused['error']})" if refused else ""
            raise UnknownNeuron(f"model {job.neuron!r} is not a served neuron{why}; available: {known}")
        self.queue.put(job)

    def _observed(self, update: AdapterUpdate) -> None:  # watcher thread: signal only
        self.observed = {**self.observed, update.domain: update.version}
        self.queue.wake()

    # -- the MLX thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - reported to start(), which raises it
            self.error = f"cannot load {self.model_dir}: {type(e).__name__}: {e}"
            self._ready.set()
            return
        self._install_published()
        self.watcher.start()  # its first scan reports what was just installed: skipped in _install
        log.info("serve_ready", model=str(self.model_dir), domains={d: s.version for d, s in self.served.items()})
        self._ready.set()
        while not self._stop.is_set():
            self._install_updates()  # between generations, never inside one
            job = self.queue.pop(self._installed(), timeout=1.0)
            if job is not None:
                self._serve(job)

    def _load(self) -> None:
        import mlx_lm

        t0 = time.perf_counter()
        loaded = mlx_lm.load(str(self.model_dir))  # (model, tokenizer)
        self._model, self._tokenizer = loaded[0], loaded[1]
        self._slot = AdapterSlot(self._model)
        log.info("base_loaded", model=str(self.model_dir), seconds=round(time.perf_counter() - t0, 3))

    @property
    def slot(self) -> AdapterSlot:
        if self._slot is None:
            raise ModelError("the base model is not loaded yet")
        return self._slot

    def _installed(self) -> str | None:
        current = self.slot.current
        if current is None:
            return BASE
        return next((d for d, s in self.served.items() if s.adapter is current), None)

    def _install_published(self) -> None:
        """Every domain's current version, before the first request (the watcher brings changes)."""
        if self.mirror is not None:  # the newest from Redis first; if Redis is away, what is here already
            try:
                self.mirror.sync_once()
            except RedisError as e:
                log.warning("serve_first_sync_failed", error=str(e))
        try:
            names = sorted(p.name for p in self.adapters_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return  # no adapters yet: the base serves; the watcher waits for the directory
        for name in names:
            try:
                version = publisher.resolve(self.adapters_dir, name)
            except (KDError, OSError) as e:
                log.warning("adapter_pointer_unreadable", domain=name, error=str(e))
                continue
            if version is not None:
                self._install(AdapterUpdate(name, version.number, version.path, {}))

    def _install_updates(self) -> None:
        try:
            updates = self.watcher.take(0)
        except WatcherFailed as e:
            if self.error is None:
                log.error("serve_watcher_failed", error=str(e))
            self.error = str(e)
            return
        for update in updates:
            self._install(update)

    def refusals(self) -> dict[str, dict[str, Any]]:
        """domain -> the newest version not installed and why (checksums: the watcher; fit: the slot)."""
        invalid = dict(self.watcher.invalid)
        bad = {d: {"version": v, "error": "its files do not match their manifest"} for d, v in invalid.items()}
        return {**bad, **self.refused}

    def _install(self, update: AdapterUpdate) -> None:
        if (served := self.served.get(update.domain)) is not None and served.path == update.path:
            return  # already serving it (the watcher's first scan repeats what start-up installed)
        t0 = time.perf_counter()
        try:
            if update.domain == BASE:
                raise AdapterSwapError(f"the domain name {BASE!r} is reserved for the bare base model")
            adapter = read_adapter(update.path)  # checksums, config, arrays: before the model is touched
            self.slot.install(adapter)  # checks every name and shape; the old adapter stays on failure
        except AdapterSwapError as e:
            self.refused = {**self.refused, update.domain: {"version": update.version, "error": str(e)}}
            log.warning("adapter_refused", domain=update.domain, version=update.version, error=str(e))
            return
        self.served = {**self.served, update.domain: Served(update.version, update.path, adapter, time.time())}
        self.refused = {d: r for d, r in self.refused.items() if d != update.domain}
        dropped = self.cache.retain(update.domain, update.version)
        self.cache_view = tuple(self.cache.describe())
        log.info(
            "adapter_installed",
            domain=update.domain,
            version=update.version,
            seconds=round(time.perf_counter() - t0, 4),
            cache_dropped=dropped,
        )

    def _switch(self, neuron: str) -> int:
        """Install `neuron`'s adapter if another one is in the model; returns its version."""
        served = None if neuron == BASE else self.served[neuron]
        target = None if served is None else served.adapter
        if self.slot.current is not target:
            result = self.slot.install(target)
            self.switches, self.switch_s = self.switches + 1, self.switch_s + result.seconds
            log.debug("neuron_switched", neuron=neuron, seconds=result.seconds)
        return 0 if served is None else served.version

    def _serve(self, job: Job) -> None:
        try:
            self._generate(job)
        except ServeError as e:
            job.emit(Failed(e.status, str(e)))
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the MLX thread
            log.error("generation_failed", job=job.id, neuron=job.neuron, error=f"{type(e).__name__}: {e}")
            job.emit(Failed(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.active = None

    def _encode(self, job: Job) -> list[int]:
        tok = self._tokenizer
        try:
            if job.messages is not None:
                if not getattr(tok, "chat_template", None):
                    raise ServeError(f"{self.model_dir} has no chat template; use /v1/completions")
                ids = list(tok.apply_chat_template(job.messages, add_generation_prompt=True))
            else:
                ids = list(tok.encode(job.prompt or ""))
        except ServeError:
            raise
        except Exception as e:  # noqa: BLE001 - a template or tokenizer rejecting this input is the client's
            raise ServeError(f"cannot tokenize the request: {type(e).__name__}: {e}") from e
        if not ids:
            raise ServeError("the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise ServeError(f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}")
        return ids

    def _check_bias(self, bias: dict[int, float] | None) -> None:
        # MLX does not bounds-check indices: an id past the vocabulary reads garbage
        rows = getattr(getattr(self._model, "args", None), "vocab_size", None) or len(self._tokenizer.vocab)
        bad = sorted(k for k in bias or {} if not 0 <= k < rows)
        if bad:
            raise ServeError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{rows - 1})")

    def _generate(self, job: Job) -> None:
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if job.cancelled.is_set():
            return
        if job.neuron != BASE and job.neuron not in self.served:
            raise UnknownNeuron(f"model {job.neuron!r} is no longer served")
        version = self._switch(job.neuron)
        ids = self._encode(job)
        key = (job.neuron, version)
        cache, rest = self.cache.fetch(key, ids)
        cache = cache if cache is not None else make_prompt_cache(self._model)
        s = job.sampling
        sampler = make_sampler(s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=s.top_k)
        self._check_bias(s.logit_bias)
        processors = make_logits_processors(
            s.logit_bias,
            s.repetition_penalty,
            s.repetition_context_size,
            s.presence_penalty,
            s.repetition_context_size,
            s.frequency_penalty,
            s.repetition_context_size,
        )
        if s.seed is not None:
            mx.random.seed(s.seed)
        active = self.active = Active(job.id, job.neuron, version, 0)
        job.emit(Started(job.neuron, version, len(ids), len(ids) - len(rest)))
        stop, generated, finish, parts = StopText(job.stop), [], "length", []
        send = job.emit if job.stream else lambda chunk: parts.append(chunk.text)  # one wake-up per answer
        stream = stream_generate(
            self._model,
            self._tokenizer,
            rest,
            max_tokens=job.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
        )
        try:
            for r in stream:
                generated.append(r.token)
                self.active = replace(active, tokens=len(generated))
                if text := stop.feed(r.text):
                    send(Chunk(text))
                finish = "stop" if stop.hit else (r.finish_reason or finish)
                if stop.hit or job.cancelled.is_set():
                    break
        finally:
            stream.close()
        if (tail := stop.flush()) and not stop.hit:
            send(Chunk(tail))
        if parts:
            job.emit(Chunk("".join(parts)))
        self.cache.insert(key, (ids + generated)[: cache[0].offset], cache)
        self.cache_view = tuple(self.cache.describe())
        job.emit(Finished(finish, len(ids), len(generated), len(ids) - len(rest)))
        log.info("generated", job=job.id, neuron=job.neuron, version=version, tokens=len(generated), finish=finish)
