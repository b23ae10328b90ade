"""kd-daemon's worker: a resident teacher distils student LoRA adapters from an RQ queue.

Importing this package has no side effects; entry points call `kd_worker.ops.blas.ensure_fast_blas()`
before anything imports `mlx.core`.
"""

__version__ = "0.1.0"
