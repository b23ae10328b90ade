"""What a request of `kd-client serve` asks for and gets back, and the order requests are served in.

No MLX here: the HTTP handlers build `Job`s, the MLX thread (kd_client/neurons.py) pops them
from a `JobQueue` and answers through `Job.emit` with `Started`, `Chunk`s, then `Finished` or
`Failed`.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import KDError


class ServeError(KDError):
    """A request the server cannot take; `status` is its HTTP status."""

    status = 400


class UnknownNeuron(ServeError):
    status = 404


class Busy(ServeError):
    status = 503


# --- what a request asks for, and what it gets back ---------------------------------------------
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Started:
    neuron: str
    version: int
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Chunk:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Started | Chunk | Finished | Failed


@dataclass
class Job:
    neuron: str
    max_tokens: int
    emit: Callable[[Event], None]  # thread-safe; called from the MLX thread
    messages: list[dict[str, Any]] | None = None  # chat: through the tokenizer's chat template
    prompt: str | None = None  # plain completion
    stop: tuple[str, ...] = ()
    stream: bool = False  # Chunk events as text comes (else one Chunk with the whole text)
    sampling: Sampling = Sampling()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: threading.Event = field(default_factory=threading.Event)
    skips: int = 0  # times a younger request of the installed domain went first


@dataclass(frozen=True)
class Active:
    job_id: str
    neuron: str
    version: int
    tokens: int


class JobQueue:
    """Waiting requests; `pop` prefers the installed neuron with bounded unfairness."""

    def __init__(self, max_jobs: int, max_skips: int):
        self.max_jobs, self.max_skips = max_jobs, max_skips
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._woken = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._cond:
            if len(self._jobs) >= self.max_jobs:
                raise Busy(f"{len(self._jobs)} requests are already waiting (KD_SERVE_MAX_QUEUED); retry later")
            self._jobs.append(job)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def pop(self, installed: str | None, timeout: float) -> Job | None:
        """The next job, or None after `timeout` or a `wake()`."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs or self._woken, timeout)
            self._woken = False
            return choose(self._jobs, installed, self.max_skips)


def choose(jobs: deque[Job], installed: str | None, max_skips: int) -> Job | None:
    """Remove and return the next job: the oldest, unless a job of the installed neuron may go first."""
    while jobs and jobs[0].cancelled.is_set():
        jobs.popleft()
    if not jobs:
        return None
    if jobs[0].neuron != installed and jobs[0].skips < max_skips:
        for i, job in enumerate(jobs):
            if job.neuron == installed and not job.cancelled.is_set():
                for passed in list(jobs)[:i]:
                    passed.skips += 1
                del jobs[i]
                return job
    return jobs.popleft()


class StopText:
    """OpenAI `stop` strings over streamed text: holds back what may be the start of a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.buffer, self.hit = "", False

    def feed(self, text: str) -> str:
        self.buffer += text
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buffer, self.hit = self.buffer[: min(found)], "", True
            return out
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.buffer.endswith(s[:n])), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
