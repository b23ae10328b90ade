"""What a running job tells the outside while it works: progress into job.meta (for kd-client
status/watch) and, from the worker's job control and the job's Redis cancel key, whether to stop."""

from __future__ import annotations

import time

import structlog
from redis import RedisError
from rq.job import Job

from jobs.models import cancel_key
from kd_worker.daemon.runtime import WorkerContext
from kd_worker.engine.hooks import Hooks, Progress, Stop

log = structlog.get_logger(__name__)


class MetaProgress(Hooks):
    """Progress -> job.meta["progress"], at most every `every_s` seconds (and on phase changes)."""

    def __init__(self, job: Job, every_s: float = 1.0):
        self.job, self.every_s = job, every_s
        self._last, self._phase = 0.0, ""

    def on_progress(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and p.phase == self._phase and p.step < p.total:
            return
        self._last, self._phase = now, p.phase
        self.job.meta["progress"] = {
            "phase": p.phase,
            "step": p.step,
            "total": p.total,
            "metrics": p.metrics,
            "tokens_per_s": p.tokens_per_s,
            "eta_s": p.eta_s,
            "updated_at": time.time(),
        }
        try:
            self.job.save_meta()
        except RedisError as e:  # progress is advisory; the job itself must not die of a Redis blip
            log.warning("progress_not_saved", error=str(e))


class JobStop(Hooks):
    """Stop requests for one run of a job: the worker's flags (rq's stop-job command for this
    execution, SIGTERM), plus the job's cancel key in Redis when it names this run (job id +
    ticket), read at most every `every_s` seconds (pubsub messages may be missed). A cancel does
    not outlive its run: a resubmission of the same data is a new run and starts uncanceled."""

    def __init__(self, ctx: WorkerContext, job_id: str, run: str, every_s: float = 1.0):
        self.ctx, self.job_id, self.run, self.every_s = ctx, job_id, run, every_s
        self._last, self._canceled = 0.0, False

    def should_stop(self) -> Stop | None:
        if self._canceled:
            return Stop("cancel")
        if (reason := self.ctx.control.reason()) is not None:
            return Stop(reason)
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                self._canceled = self.ctx.connection.get(cancel_key(self.job_id)) == self.run.encode()
            except RedisError:
                pass  # Redis away: the job keeps training; cancel is checked again later
        return Stop("cancel") if self._canceled else None
