"""fp32 matmul in MLX vs numpy, same process. Target on Linux: MLX within 2x of numpy.

.venv/bin/python -m bench.blas
"""

from __future__ import annotations

from bench.common import BLAS, best_of, report


def main() -> None:
    import mlx.core as mx
    import numpy as np

    rows = []
    for n in (1024, 2048):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        an, bn = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
        t_mlx = best_of(lambda a=a, b=b: mx.eval(a @ b))
        t_np = best_of(lambda an=an, bn=bn: an @ bn)
        gf = 2 * n**3 / 1e9
        rows.append([n, t_mlx * 1e3, t_np * 1e3, gf / t_mlx, gf / t_np, t_mlx / t_np])
    report(
        "blas",
        f"fp32 matmul, MLX ({BLAS.library or 'platform BLAS'}) vs numpy",
        ["n", "mlx ms", "numpy ms", "mlx GFLOP/s", "numpy GFLOP/s", "mlx/numpy time"],
        rows,
        {"target": "mlx/numpy time <= 2.0", "met": all(r[-1] <= 2.0 for r in rows)},
    )


if __name__ == "__main__":
    main()
