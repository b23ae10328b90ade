"""Shared by the benchmarks: a fast BLAS before mlx, machine facts, a table, a JSON result file.

Import this module first in every benchmark (it loads OpenBLAS before anything imports mlx).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kd_worker.blas import ensure_fast_blas

BLAS = ensure_fast_blas()
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    if sys.platform == "linux":
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    elif sys.platform == "darwin":
        cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "mlx": mx.__version__,
        "device": str(mx.default_device()), "blas": BLAS.library, "openblas_coretype": BLAS.coretype,
    }


def best_of(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls (seconds) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def report(name: str, title: str, columns: list[str], rows: list[list[Any]], extra: dict[str, Any] | None = None) -> Path:
    """Print a table and save {machine, columns, rows, extra} to bench/results/{name}.json."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "machine": machine(), "columns": columns, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return path
