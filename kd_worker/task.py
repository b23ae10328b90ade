"""The rq entry point's name in kd-daemon 0.1, kept so that jobs queued before an upgrade still run
(jobs.models.LEGACY_TASK_FUNCS). New jobs name `kd_worker.daemon.task.run_kd_job`."""

from kd_worker.daemon.task import run_kd_job

__all__ = ["run_kd_job"]
