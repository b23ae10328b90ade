"""Publish on B -> swapped on A, through Redis: how long a second machine waits for a new version.

B (this process) publishes as a worker with KD_PUBLISH_TO=both does: reserve the number in Redis,
publish into B's adapters_kd/, push (kd_client/mirror.py). A holds the base model and is fed from
Redis only, into a directory of its own, in one of two ways:

  sync+watch   `kd-client sync --follow` (its own process) into A's adapters_kd/, an AdapterWatcher
               on that directory (inotify, 200 ms debounce as `kd-client serve`), AdapterSlot.apply
  mirror       an AdapterWatcher with a Mirror: the sync loop in the watcher's thread (what
               `kd-client serve` and `follow` do with KD_ADAPTERS_SOURCE=redis), AdapterSlot.apply

Times are from the start of B's publish: `published` (B's local publish done), `pushed` (the
version current in Redis) and `swapped` (AdapterSlot.apply returned on A), the median over the
versions. Both hosts share this machine's loopback and CPU. Adapters: LoRA rank 8 on every layer's
attention and MLP projections (mlx-lm's default keys), random weights, fp32 as the CPU worker saves.
Redis memory: `INFO memory` used_memory before the first push and with KD_KEEP_VERSIONS (5)
versions retained per mode's domain.

    .venv/bin/python -m bench.sync [--shapes tiny,0.5B] [--versions 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, report

CACHE = REPO / ".kd" / "bench-models"
KEEP = 5


def build(shape: str, tmp: Path) -> Path:
    if shape == "tiny":
        from kd_worker.fixtures.tinymodels import build_demo_models

        return build_demo_models(tmp / "models", ("student",))["student"]
    from kd_worker.fixtures.qwenvocab import build_qwen_shaped

    return build_qwen_shaped(CACHE / f"qwen2.5-{shape}", shape)


def lora_shapes(model: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Names and shapes of rank-8 LoRA arrays on every layer (mlx-lm's default keys), and the config."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    params = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    return shapes, {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": params}


def publish_on_b(conn, root: Path, domain: str, shapes: dict, config: dict, seed: int) -> dict[str, Any]:
    """What the worker does inside the publish order; returns the version and its timeline."""
    import numpy as np
    from safetensors.numpy import save_file

    from jobs import publisher
    from kd_client import mirror

    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}  # made before the clock

    def write(stage: Path) -> None:
        save_file(weights, str(stage / "adapters.safetensors"), metadata={"format": "mlx"})
        publisher.write_json_atomic(stage / "adapter_config.json", config)
        publisher.write_json_atomic(stage / "kd_metrics.json", {"seed": seed})

    t0 = time.perf_counter()
    held = publisher.versions(root, domain)
    first = mirror.reserve_number(conn, domain, (held[-1].number if held else 0) + 1)
    version = publisher.publish(root, domain, write, {"seed": seed}, keep=KEEP, first_number=first)
    published = time.perf_counter()
    pushed = mirror.push(conn, version, KEEP, 1 << 30)
    return {
        "t0": t0,
        "version": version.number,
        "published_s": published - t0,
        "pushed_s": time.perf_counter() - t0,
        "bytes": pushed["version_bytes"],
    }


def swap_next(watcher, slot, version: int, timeout: float = 120.0) -> float:
    """Wait for A's watcher to report `version`, swap it in; the perf_counter when the swap returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for update in watcher.take(0.01):
            if update.version == version:
                slot.apply(update.path)
                return time.perf_counter()
    raise TimeoutError(f"A never reported v{version}")


def run_mode(mode: str, conn, url: str, tmp: Path, slot, shapes, config, versions: int) -> list:
    from kd_client.mirror import Mirror
    from kd_client.watcher import AdapterWatcher
    from kd_worker.fixtures.demo import venv_bin

    domain = "memory" if mode == "mirror" else "task"
    b_root, a_root = tmp / mode / "b", tmp / mode / "a"
    sync = None
    if mode == "mirror":
        watcher = AdapterWatcher(a_root, [domain], mirror=Mirror(conn, a_root, [domain], keep=KEEP))
    else:
        env = {**os.environ, "KD_REDIS_URL": url, "KD_ADAPTERS_DIR": str(a_root), "KD_KEEP_VERSIONS": str(KEEP)}
        sync = subprocess.Popen(
            [venv_bin("kd-client"), "sync", "--follow", "--domains", domain], env=env, stdout=subprocess.DEVNULL
        )
        watcher = AdapterWatcher(a_root, [domain], debounce_ms=200, step_ms=20)
    rows = []
    try:
        with watcher:
            for i in range(versions + 1):  # the first warms up both sides (page cache, MLX kernels)
                seed = i + (0 if mode == "mirror" else 1000)  # no weights shared between the modes' domains
                pub = publish_on_b(conn, b_root, domain, shapes, config, seed=seed)
                swapped = swap_next(watcher, slot, pub["version"]) - pub["t0"]
                if i:
                    rows.append({**pub, "swapped_s": swapped})
    finally:
        if sync is not None:
            sync.terminate()
            sync.wait(30)
    return rows


def measure(shape: str, tmp: Path, versions: int, url: str) -> tuple[list[list[Any]], dict[str, Any]]:
    import mlx.core as mx
    import mlx_lm
    import redis

    from kd_client.hotswap import AdapterSlot

    conn = redis.Redis.from_url(url)
    conn.flushall()
    base = build(shape, tmp)
    slot = AdapterSlot(mlx_lm.load(str(base))[0])  # A's resident base
    shapes, config = lora_shapes(mlx_lm.load(str(base), lazy=True)[0])  # names and shapes only
    gc.collect()
    mx.clear_cache()
    before = conn.info("memory")["used_memory"]
    out, detail = [], {}
    for mode in ("mirror", "sync+watch"):
        rows = run_mode(mode, conn, url, tmp / shape, slot, shapes, config, versions)
        med = {k: statistics.median(r[k] for r in rows) for k in ("published_s", "pushed_s", "swapped_s")}
        mb = rows[0]["bytes"] / 1e6
        out.append([shape, mode, round(mb, 1), med["published_s"], med["pushed_s"], med["swapped_s"]])
        detail[mode] = rows
    after = conn.info("memory")["used_memory"]
    payload = sum(conn.strlen(k) for k in conn.scan_iter("kd:pub:blob:*"))
    retained = {d: conn.hlen(f"kd:pub:versions:{d}") for d in ("memory", "task")}
    memory = {"used_memory_before": before, "used_memory_after": after, "blob_bytes": payload, "retained": retained}
    return out, {"rows": detail, "redis_memory": memory}


def main() -> None:
    import logging

    import structlog

    from kd_worker.fixtures.demo import managed_redis
    from kd_worker.settings import WorkerSettings

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,0.5B")
    ap.add_argument("--versions", type=int, default=KEEP + 1, help="timed versions per mode (after one warm-up)")
    args = ap.parse_args()
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-sync-") as tmp:
        with managed_redis(WorkerSettings(), Path(tmp), explicit_url=False) as url:
            for shape in args.shapes.split(","):
                shape_rows, extra[shape] = measure(shape, Path(tmp), args.versions, url)
                rows += shape_rows
                mem = extra[shape]["redis_memory"]
                print(
                    f"{shape}: Redis used_memory {mem['used_memory_before'] / 1e6:.1f} -> "
                    f"{mem['used_memory_after'] / 1e6:.1f} MB, blobs {mem['blob_bytes'] / 1e6:.1f} MB, "
                    f"retained versions {mem['retained']}"
                )
    report(
        "sync",
        "publish on B -> swapped on A through Redis (median seconds from the start of B's publish)",
        ["shape", "A fed by", "MB", "published", "pushed", "swapped on A"],
        rows,
        {
            **extra,
            "note": "B and A on one machine (loopback), other work running on the shared 2-core machine; "
            "sync+watch: kd-client sync --follow process + inotify watcher (200 ms debounce); "
            "mirror: AdapterWatcher(mirror=...), the sync loop in the watcher thread",
        },
    )


if __name__ == "__main__":
    main()
