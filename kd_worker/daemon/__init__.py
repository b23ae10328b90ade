"""Serving the queue: the rq SimpleWorker with its allow-list, the one task entry point, per-domain
publish ordering, the resident-model runtime with job control, progress into job.meta, and the life of
a job across retries (idempotent outcomes).

May import `kd_worker.engine`; must not import `kd_worker.ops`, `kd_worker.fixtures` or `kd_worker.cli`.
"""
