"""Serving the neurons: `kd-client serve` against mlx_lm.server on the same base.

Each server runs as its own process and answers the same sequence of non-streaming chat
requests (greedy, `--tokens` new tokens each, EOS suppressed by logit_bias on both so every
answer has the same length, distinct prompts). The sequence alternates pairs of domains,
A A B B A A ..., so half the requests follow a request of the same domain and half follow a
switch; both kinds are measured under the same machine load.

kd-client serve    one resident base; a domain switch is an in-place swap of LoRA arrays held
                   in memory (kd_client/hotswap.py)
mlx_lm.server      the same base; per-request adapters (`"adapters": <version dir>` in the body),
                   which reload the whole model whenever the adapter changes

Columns: median latency of a request after one of the same domain and after a switch, what a
switch adds, decode tokens/s with one domain (same-domain requests), the process's resident
memory after it served six domains (kd) or one (mlx_lm.server; six neurons = six processes).

    .venv/bin/python -m bench.serve [--shapes tiny,0.5B] [--requests 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BLAS, REPO, report

DOMAINS = ("thinking", "task", "action", "reflection", "debug", "memory")
CACHE = REPO / ".kd" / "bench-models"


def build(shape: str, tmp: Path) -> Path:
    if shape == "tiny":
        from kd_worker.fixtures.tinymodels import build_demo_models

        return build_demo_models(tmp / "models", ("student",))["student"]
    from kd_worker.fixtures.qwenvocab import build_qwen_shaped

    return build_qwen_shaped(CACHE / f"qwen2.5-{shape}", shape)


def publish_six(model_dir: Path, root: Path, layers: int = 16, rank: int = 8) -> dict[str, Path]:
    """One published version per domain: random LoRA arrays (KD's default rank/layers), real publisher."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from jobs import publisher

    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, min(layers, len(model.layers)), params)
    shapes = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    del model
    gc.collect()
    mx.clear_cache()
    config = {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": params}
    out = {}
    for seed, domain in enumerate(DOMAINS):
        mx.random.seed(seed)
        weights = {k: mx.random.normal(s) * (0.01 if k.endswith("lora_b") else 0.1) for k, s in shapes.items()}

        def write(stage: Path, w: dict = weights) -> None:
            mx.save_safetensors(str(stage / "adapters.safetensors"), w, metadata={"format": "mlx"})
            publisher.write_json_atomic(stage / "adapter_config.json", config)

        out[domain] = publisher.publish(root, domain, write, {"seed": seed}).path
    return out


# --- a server process ---------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("KD_")}
    if BLAS.library and "openblas" in BLAS.library.lower():
        env["LD_PRELOAD"] = BLAS.library  # both servers get the same BLAS
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, method: str, path: str, body: Any = None, timeout: float = 900) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class Server:
    def __init__(self, args: list[str], port: int, log: Path):
        self.port, self.log = port, log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(args, env=_env(), stdout=f, stderr=subprocess.STDOUT)

    def wait(self, path: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if _http(self.port, "GET", path, timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)  # polling the server's start-up
        raise TimeoutError(f"server on {self.port} not up after {timeout}s")

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory of the process, MB."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ":" in line
        )
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def run_sequence(port: int, body_for, sequence: list[str], tokens: int) -> list[tuple[bool, float, int]]:
    """(after a switch?, seconds, completion tokens) per request."""
    out, previous = [], None
    for i, domain in enumerate(sequence):
        t0 = time.perf_counter()
        status, reply = _http(port, "POST", "/v1/chat/completions", body_for(domain, i))
        seconds = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"request {i} ({domain}) failed: {status} {reply}")
        out.append((previous is not None and domain != previous, seconds, reply["usage"]["completion_tokens"]))
        previous = domain
    if any(n != tokens for _, _, n in out):
        raise RuntimeError(f"answers of unequal length: {[n for _, _, n in out]}")
    return out


def summarise(results: list[tuple[bool, float, int]]) -> dict[str, float]:
    same = [s for switched, s, _ in results if not switched]
    after = [s for switched, s, _ in results if switched]
    med_same, med_after = statistics.median(same), statistics.median(after)
    return {
        "same_ms": med_same * 1000,
        "switch_ms": med_after * 1000,
        "switch_adds": (med_after - med_same) / med_same,
        "tok_s": sum(n for sw, _, n in results if not sw) / sum(same),
    }


def measure(shape: str, tmp: Path, n_requests: int, tokens: int) -> list[dict[str, Any]]:
    model = build(shape, tmp)
    versions = publish_six(model, tmp / f"adapters-{shape}")
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    a, b = DOMAINS[0], DOMAINS[1]
    sequence = [(a, a, b, b)[i % 4] for i in range(n_requests + 1)]  # the first request is a warm-up

    def prompt(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Request {i}: what should the assistant remember about this user?"}]

    common = {"max_tokens": tokens, "temperature": 0.0, "logit_bias": {str(eos): -1e9}}
    rows = []

    port = _free_port()
    kd = Server([str(REPO / ".venv/bin/kd-client"), "serve", "--model", str(model), "--adapters",
                 str(tmp / f"adapters-{shape}"), "--port", str(port)], port, tmp / f"kd-{shape}.log")  # fmt: skip
    try:
        kd.wait("/health")
        for d in DOMAINS:  # hold all six (and warm each up)
            _http(port, "POST", "/v1/chat/completions", {"model": d, "messages": prompt(99), **common, "max_tokens": 2})
        res = run_sequence(port, lambda d, i: {"model": d, "messages": prompt(i), **common}, sequence, tokens)[1:]
        health = _http(port, "GET", "/health")[1]
        rss, peak = kd.rss_mb()
        swap_ms = health["switch_ms_total"] / max(health["switches"], 1)
        rows.append({"shape": shape, "server": "kd-client serve", **summarise(res), "rss_mb": rss, "peak_mb": peak,
                     "six_mb": rss, "in_server_swap_ms": swap_ms})  # fmt: skip
    finally:
        kd.stop()

    port = _free_port()
    ml = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port)], port,
                tmp / f"mlx-{shape}.log")  # fmt: skip
    try:
        ml.wait("/v1/models")

        def body(d: str, i: int) -> dict[str, Any]:
            return {"model": str(model), "adapters": str(versions[d]), "messages": prompt(i), **common}

        res = run_sequence(port, body, sequence, tokens)[1:]
        rss, peak = ml.rss_mb()
        rows.append({"shape": shape, "server": "mlx_lm.server", **summarise(res), "rss_mb": rss, "peak_mb": peak,
                     "six_mb": 6 * rss, "in_server_swap_ms": None})  # fmt: skip
    finally:
        ml.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,0.5B")
    ap.add_argument("--requests", type=int, default=8, help="timed requests per server (after one warm-up)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            rows += measure(shape, Path(tmp), args.requests, args.tokens)
            gc.collect()
    columns = ["model", "server", "same-domain ms", "after a switch ms", "switch adds", "tok/s one domain",
               "RSS MB", "six neurons MB", "in-server swap ms"]  # fmt: skip
    table = [
        [r["shape"], r["server"], r["same_ms"], r["switch_ms"], f"{r['switch_adds']:+.1%}", r["tok_s"], r["rss_mb"],
         r["six_mb"], "-" if r["in_server_swap_ms"] is None else r["in_server_swap_ms"]]
        for r in rows
    ]  # fmt: skip
    report(
        "serve",
        f"kd-client serve vs mlx_lm.server: {args.tokens}-token greedy chat requests, domains alternating in pairs",
        columns,
        table,
        {
            "results": rows,
            "requests": args.requests,
            "tokens": args.tokens,
            "notes": "shared 2-core machine: other engineers' work was running (timings include contention); "
            "six neurons for mlx_lm.server = 6 x one process's RSS (computed); LoRA rank 8 on 16 layers "
            "(or all, if fewer); EOS suppressed by logit_bias on both servers; fp32 on CPU, OpenBLAS preloaded",
        },
    )


if __name__ == "__main__":
    main()
