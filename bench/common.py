"""Shared by the benchmarks: a fast BLAS before mlx, machine facts, a table, a JSON result file,
the bundled sample prompts, a wait for a queued job.

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

from kd_worker.ops.blas import ensure_fast_blas

BLAS = ensure_fast_blas()
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FINAL = {"finished", "failed", "stopped", "canceled"}  # rq states a job never leaves


def machine() -> dict[str, Any]:
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    if sys.platform == "linux":
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    elif sys.platform == "darwin":
        cpu = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": BLAS.library,
        "openblas_coretype": BLAS.coretype,
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


def report(
    name: str,
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    extra: dict[str, Any] | None = None,
    results_dir: Path = RESULTS,
) -> Path:
    """Print a table and save {machine, columns, rows, extra} to bench/results/{name}.json."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    doc = {"benchmark": name, "machine": machine(), "columns": columns, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return path


def sample_prompts() -> list[str]:
    """The prompts of the bundled domain samples (jobs/samples/*.jsonl), in file order."""
    from kd_worker.fixtures.tinymodels import bundled_prompts

    return bundled_prompts()


def wait_job(conn, job_id: str, timeout: float):
    """The finished rq job. Raises once it is final in any other state (its timings would measure
    nothing) or still not final after `timeout` seconds: a bench never hangs on a job."""
    from kd_client import queue as Q

    deadline = time.monotonic() + timeout
    while (status := (job := Q.fetch(conn, job_id)).get_status()) not in FINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {status} after {timeout}s")
        time.sleep(0.01)  # polling the job state
    if status != "finished":
        raise RuntimeError(f"job {job_id} ended {status}: {Q.describe(job).get('error')}")
    return job
