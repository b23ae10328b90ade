"""The continual loop around one job: the domain's corpus (Redis, `kd_client.corpus`) in, the
engine's `Continual` out, and the job's held-out split back into the regression set.

    data validated -> record the job's examples in the corpus (BEFORE training: a kill mid-job
      loses nothing, a retry records nothing twice) -> freeze the run's replay sample and warm-start
      version in run_dir/continual.json (a resumed run trains on exactly the same history, however
      the corpus grew meanwhile) -> fetch the regression set -> engine.distill, gate, publish
      -> the held-out split joins the regression set (after the gate: a job's gate never counts
      its own split twice)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from jobs import publisher
from jobs.config import KDConfig
from jobs.corpus import CorpusRecord
from kd_client.corpus import NewExample, Recorded
from kd_worker.engine.data import Example
from kd_worker.engine.types import Continual, DistillRequest

log = structlog.get_logger(__name__)

FROZEN = "continual.json"  # in the run directory: the replay sample and warm-start version of the run


class DomainCorpus(Protocol):
    """What a job needs of its domain's corpus (`kd_client.corpus.Corpus` in the worker)."""

    domain: str

    def record(
        self, examples: Sequence[NewExample], job_id: str, submitter: str, at: datetime | None = None
    ) -> Recorded: ...
    def history(self, exclude: Collection[str] = ()) -> list[tuple[str, int]]: ...
    def get(self, keys: Sequence[str]) -> list[CorpusRecord]: ...
    def regression_keys(self) -> list[str]: ...
    def offer_regression(self, keys: Sequence[str]) -> list[str]: ...


def record_job(corpus: DomainCorpus, req: DistillRequest, train: Sequence[Example], val: Sequence[Example]) -> None:
    """The job's examples into the corpus, each with its role in this job's split."""
    examples = [NewExample(e.key, e.prompt, e.response, "train") for e in train]
    examples += [NewExample(e.key, e.prompt, e.response, "held_out") for e in val]
    done = corpus.record(examples, req.job_id or req.run_id, req.submitter)
    log.info("corpus_recorded", added=done.added, known=done.known, examples=done.examples, bytes=done.bytes)


def choose_replay(history: Sequence[tuple[str, int]], n: int, seed: int, run_id: str) -> list[str]:
    """At most n keys of `history` ((key, seq) pairs), uniformly without replacement, oldest first:
    a pure function of (seed, run id, corpus snapshot)."""
    ordered = sorted(history, key=lambda kv: kv[1])
    if len(ordered) <= n:
        return [k for k, _ in ordered]
    rng = np.random.default_rng([seed, int(hashlib.sha256(run_id.encode()).hexdigest()[:16], 16)])
    return [ordered[i][0] for i in np.sort(rng.choice(len(ordered), n, replace=False))]


def example_of(rec: CorpusRecord, what: str) -> Example:
    return Example(rec.key, rec.messages(), rec.response, f"{what} example {rec.key[:12]}")


def published_dir(adapters_dir: Path, domain: str, number: int | None) -> Path | None:
    """The directory of version `number` (it may have been pruned since; then warm start falls back)."""
    if number is None:
        return None
    return publisher.domain_dir(adapters_dir, domain) / "versions" / f"{number:04d}"


def freeze(
    corpus: DomainCorpus | None, req: DistillRequest, cfg: KDConfig, own: Collection[str], adapters_dir: Path
) -> dict[str, Any]:
    """The run's replay sample and warm-start version, chosen at its first start."""
    replay: list[CorpusRecord] = []
    if corpus is not None and cfg.replay > 0 and cfg.replay_max_examples > 0:
        history = corpus.history(exclude=own)
        replay = corpus.get(choose_replay(history, cfg.replay_max_examples, cfg.seed, req.run_id))
    current = publisher.resolve(adapters_dir, req.domain) if cfg.init == "current" else None
    return {
        "schema": 1,
        "replay": [{"key": r.key, "prompt": list(r.messages()), "response": r.response} for r in replay],
        "init_version": current.number if current is not None else None,
    }


def plan(
    corpus: DomainCorpus | None,
    req: DistillRequest,
    cfg: KDConfig,
    examples: Sequence[Example],
    run_dir: Path,
    adapters_dir: Path,
) -> Continual:
    """The job's replay, regression set and warm start. The first two come from the corpus (none
    without one, e.g. `kd-worker distill`); replay and warm start are frozen at the run's first start."""
    own = {e.key for e in examples}
    path = run_dir / FROZEN
    try:
        frozen = json.loads(path.read_text())
    except FileNotFoundError:
        frozen = freeze(corpus, req, cfg, own, adapters_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        publisher.write_json_atomic(path, frozen)
    replay = tuple(
        Example(r["key"], tuple(r["prompt"]), r["response"], f"replayed example {r['key'][:12]}")
        for r in frozen["replay"]
    )
    regression: tuple[Example, ...] = ()
    if corpus is not None:
        keys = [k for k in corpus.regression_keys() if k not in own]
        regression = tuple(example_of(r, "regression-set") for r in corpus.get(keys))
    init_from = published_dir(adapters_dir, req.domain, frozen["init_version"]) if cfg.init == "current" else None
    log.info("continual_plan", replay=len(replay), regression=len(regression), init=cfg.init, init_from=str(init_from))
    return Continual(replay, regression, init_from)


def conclude(corpus: DomainCorpus | None, val: Sequence[Example]) -> None:
    """The job's held-out split joins the domain's regression set (reservoir-capped)."""
    if corpus is None or not val:
        return
    joined = corpus.offer_regression([e.key for e in val])
    log.info("regression_set_joined", offered=len(val), joined=len(joined))
