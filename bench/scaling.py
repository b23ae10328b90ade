"""Cost vs number of examples: a whole job (teacher phase, sequence building, one epoch of
training) through run_job at 12..96 examples. Flat seconds-per-example = linear cost.

    .venv/bin/python -m bench.scaling [--sizes 12 24 48 96]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import report, sample_prompts


def prompts(n: int) -> list[dict]:
    base = sample_prompts()
    return [{"prompt": f"{base[i % len(base)]} (case {i})"} for i in range(n)]


def run(n: int, root: Path, models: dict[str, Path]) -> dict[str, float]:
    from jobs.config import resolve_config
    from kd_worker.daemon.lifecycle import run_job
    from kd_worker.daemon.runtime import Runtime
    from kd_worker.engine.hooks import Hooks
    from kd_worker.engine.types import DistillRequest
    from kd_worker.settings import WorkerSettings

    data = root / f"p{n}.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts(n)))
    s = WorkerSettings(work_dir=root / f"work{n}", adapters_dir=root / f"ad{n}")
    iters = max(1, n // 4)  # one epoch at batch size 4
    over = {"iterations": iters, "gen_max_tokens": 32, "val_fraction": 0.0, "save_every": iters, "val_every": iters}
    req = DistillRequest("memory", (("prompts", data),), models["teacher"], models["student"], f"n{n}")
    t = time.perf_counter()
    out = run_job(req, resolve_config(over), Runtime(s), s, Hooks())
    total = time.perf_counter() - t
    m = json.loads((Path(out["adapter_path"]) / "kd_metrics.json").read_text())
    return {"total": total, "teacher": m["timing"]["teacher_s"], "train": m["timing"]["train_s"], "iters": iters}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[12, 24, 48, 96])
    args = ap.parse_args()
    from kd_worker.fixtures.tinymodels import build_demo_models

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_demo_models(Path(tmp) / "models", ("teacher", "student"))
        run(8, Path(tmp), models)  # warm-up: imports, compilation
        for n in args.sizes:
            r = run(n, Path(tmp), models)
            rows.append(
                [
                    n,
                    r["iters"],
                    r["teacher"],
                    r["train"],
                    r["total"],
                    r["teacher"] / n * 1e3,
                    r["train"] / n * 1e3,
                    r["total"] / n * 1e3,
                ]
            )
    report(
        "scaling",
        "cost vs examples (tiny models, one epoch, 32 generated tokens each)",
        ["examples", "steps", "teacher s", "train s", "job s", "teacher ms/ex", "train ms/ex", "job ms/ex"],
        rows,
        {"expectation": "ms per example roughly flat (linear cost)"},
    )


if __name__ == "__main__":
    main()
