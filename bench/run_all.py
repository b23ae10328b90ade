"""Run every benchmark (each prints its table and writes bench/results/*.json):

    make bench          # or: .venv/bin/python -m bench.run_all [--quick]

Each benchmark runs in its own process (a fresh MLX memory pool and clean peak-memory counters).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

FULL = [
    ["bench.blas"],
    ["bench.step"],
    ["bench.datagen"],
    ["bench.targets"],
    ["bench.topk"],
    ["bench.scaling"],
    ["bench.queue"],
    ["bench.resident", "--shape", "tiny"],
    ["bench.resident", "--shape", "medium"],
    ["bench.hotswap"],
    ["bench.serve"],
    ["bench.sync"],
    ["bench.continual"],  # the longest (about an hour on 2 shared cores); also `make bench-continual`
    ["bench.onpolicy_cost"],
]
QUICK = {
    "bench.step": ["--vocab", "2048", "32000"],
    "bench.datagen": ["--model", "fixture"],
    "bench.scaling": ["--sizes", "12", "24", "48"],
    "bench.queue": ["--jobs", "4"],
    "bench.serve": ["--shapes", "tiny"],
    "bench.sync": ["--shapes", "tiny"],
    "bench.continual": ["--jobs", "3", "--seeds", "0", "--rows", "fresh", "warm+replay", "--name", "continual-quick"],
    "bench.onpolicy_cost": ["--vocab", "2048"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes (minutes, not tens of minutes)")
    args = ap.parse_args()
    failed = []
    for cmd in FULL:
        if args.quick and cmd[-1] == "medium":
            continue
        extra = QUICK.get(cmd[0], []) if args.quick else []
        print(f"\n=== python -m {' '.join(cmd + extra)}", flush=True)
        t = time.perf_counter()
        if subprocess.run([sys.executable, "-m", *cmd, *extra]).returncode != 0:
            failed.append(cmd[0])
        print(f"=== {cmd[0]}: {time.perf_counter() - t:.0f} s", flush=True)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
