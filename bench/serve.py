"""Serving the neurons: `kd-client serve` against mlx_lm.server on the same base.

Both servers run side by side, each its own process, on the same base and the same adapters,
and answer the same non-streaming chat requests one at a time, alternating between the servers
so both see the same machine load (greedy, EOS suppressed by logit_bias on both so every answer
has its full length, distinct prompts).

kd-client serve    one resident base; a domain switch is an in-place swap of LoRA arrays held
                   in memory (kd_client/hotswap.py)
mlx_lm.server      the same base; per-request adapters (`"adapters": <version dir>` in the body),
                   which reload the whole model whenever the adapter changes

switch     2-token answers, domains in pairs (A A B B ...): median after a switch minus median
           after the same domain, and that as a share of a `--tokens`-token answer
tok/s      `--tokens`-token answers of one domain (prefill and HTTP included)
memory     resident memory of kd-client serve holding six domains, against six mlx_lm.server
           processes of one `--adapter-path` each (one measured, x6)

    .venv/bin/python -m bench.serve [--shapes tiny,0.5B] [--switches 32,16] [--generations 12,3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


def run_interleaved(servers: dict[str, tuple[int, Any]], sequence: list[str], tokens: int) -> dict[str, list]:
    """Request i goes to every server in turn before request i+1, so both see the same machine
    load. Per server: (after a switch?, seconds, completion tokens) per request."""
    out: dict[str, list] = {name: [] for name in servers}
    for i, domain in enumerate(sequence):
        for name, (port, body_for) in servers.items():
            t0 = time.perf_counter()
            status, reply = _http(port, "POST", "/v1/chat/completions", body_for(domain, i))
            seconds = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"{name}: request {i} ({domain}) failed: {status} {reply}")
            switched = i > 0 and domain != sequence[i - 1]
            out[name].append((switched, seconds, reply["usage"]["completion_tokens"]))
    for name, results in out.items():
        if any(n != tokens for _, _, n in results):
            raise RuntimeError(f"{name}: answers of unequal length: {[n for _, _, n in results]}")
    return out


def median_ms(results: list[tuple[bool, float, int]], switched: bool | None = None) -> float:
    return 1000 * statistics.median(s for sw, s, _ in results if switched is None or sw == switched)


def measure(shape: str, tmp: Path, n_switch: int, n_gen: int, tokens: int) -> list[dict[str, Any]]:
    model = build(shape, tmp)
    versions = publish_six(model, tmp / f"adapters-{shape}")
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    a, b = DOMAINS[0], DOMAINS[1]

    def prompt(i: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"Request {i}: what should the assistant remember about this user?"}]

    def servers(n: int) -> dict[str, tuple[int, Any]]:
        common = {"max_tokens": n, "temperature": 0.0, "logit_bias": {str(eos): -1e9}}
        return {
            "kd-client serve": (kd_port, lambda d, i: {"model": d, "messages": prompt(i), **common}),
            "mlx_lm.server": (
                ml_port,
                lambda d, i: {"model": str(model), "adapters": str(versions[d]), "messages": prompt(i), **common},
            ),
        }

    kd_port, ml_port = _free_port(), _free_port()
    kd = Server([str(REPO / ".venv/bin/kd-client"), "serve", "--model", str(model), "--adapters",
                 str(tmp / f"adapters-{shape}"), "--port", str(kd_port)], kd_port, tmp / f"kd-{shape}.log")  # fmt: skip
    ml = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(ml_port)], ml_port,
                tmp / f"mlx-{shape}.log")  # fmt: skip
    try:
        kd.wait("/health")
        ml.wait("/v1/models")
        for d in DOMAINS:  # kd holds all six (each warmed up once)
            run_interleaved({"kd-client serve": servers(2)["kd-client serve"]}, [d], 2)
        # switch cost: short answers (the switch is then most of what differs), domains in pairs
        switching = [(a, a, b, b)[i % 4] for i in range(n_switch + 1)]
        short = {name: res[1:] for name, res in run_interleaved(servers(2), switching, 2).items()}
        # generation: `tokens`-token answers of one domain
        long = run_interleaved(servers(tokens), [a] * n_gen, tokens)
        health = _http(kd_port, "GET", "/health")[1]
        kd_rss = kd.rss_mb()[0]
    finally:
        kd.stop()
        ml.stop()
    one_port = _free_port()  # mlx_lm.server as one neuron per process: its memory, x6
    one = Server([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--adapter-path",
                  str(versions[a]), "--port", str(one_port)], one_port, tmp / f"mlx-one-{shape}.log")  # fmt: skip
    try:
        one.wait("/v1/models")
        _http(one_port, "POST", "/v1/chat/completions", {"messages": prompt(0), "max_tokens": 2})
        one_rss = one.rss_mb()[0]
    finally:
        one.stop()
    rows = []
    for name, memory, six in (("kd-client serve", kd_rss, kd_rss), ("mlx_lm.server", one_rss, 6 * one_rss)):
        added = median_ms(short[name], True) - median_ms(short[name], False)
        gen = median_ms(long[name])
        rows.append({
            "shape": shape, "server": name, "short_same_ms": median_ms(short[name], False),
            "short_switch_ms": median_ms(short[name], True), "switch_added_ms": added, "gen_ms": gen,
            "switch_adds": added / gen, "tok_s": tokens / (gen / 1000), "rss_mb": memory, "six_mb": six,
            "in_server_swap_ms": health["switch_ms_total"] / max(health["switches"], 1) if name[0] == "k" else None,
            "latencies_ms": {k: [(sw, round(t * 1000, 1)) for sw, t, _ in v[name]] for k, v in
                             (("short", short), ("long", long))},
        })  # fmt: skip
    ratios = [k[1] / m[1] for k, m in zip(long["kd-client serve"], long["mlx_lm.server"], strict=True)]
    rows[0]["gen_time_vs_mlx_paired"] = statistics.median(ratios)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,0.5B")
    ap.add_argument("--switches", default="32,16", help="short requests per server and shape, domains in pairs")
    ap.add_argument("--generations", default="12,3", help="`--tokens`-token requests per server and shape")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    switches = [int(n) for n in args.switches.split(",")]
    generations = [int(n) for n in args.generations.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for i, shape in enumerate(args.shapes.split(",")):
            n_switch, n_gen = switches[min(i, len(switches) - 1)], generations[min(i, len(generations) - 1)]
            rows += measure(shape, Path(tmp), n_switch, n_gen, args.tokens)
            gc.collect()
    columns = ["model", "server", "2-token answer ms", "after a switch ms", "switch adds ms",
               f"{args.tokens}-token answer ms", f"switch adds to a {args.tokens}-token answer", "tok/s one domain",
               "RSS MB", "six neurons MB", "in-server swap ms"]  # fmt: skip
    table = [
        [r["shape"], r["server"], r["short_same_ms"], r["short_switch_ms"], r["switch_added_ms"], r["gen_ms"],
         f"{r['switch_adds']:+.2%}", r["tok_s"], r["rss_mb"], r["six_mb"],
         "-" if r["in_server_swap_ms"] is None else r["in_server_swap_ms"]]
        for r in rows
    ]  # fmt: skip
    report(
        "serve",
        f"kd-client serve vs mlx_lm.server (same base, same requests, interleaved), {args.tokens}-token greedy answers",
        columns,
        table,
        {
            "results": rows,
            "switches": args.switches,
            "generations": args.generations,
            "tokens": args.tokens,
            "loadavg_1_5_15": {"start": load_before, "end": os.getloadavg(), "cores": os.cpu_count()},
            "notes": "shared 2-core machine with other engineers' work running (see loadavg): single latencies "
            "vary by tens of percent, so a switch's cost is taken from short (2-token) answers and related to "
            "the median long answer; in-server swap ms is kd's own timing of the in-place swap. mlx_lm.server "
            "switches with per-request adapters (a full reload); its memory is one `--adapter-path` process "
            "x6 (computed). LoRA rank 8 on 16 layers (or all, if fewer); EOS suppressed by logit_bias on both "
            "servers; fp32 on CPU, OpenBLAS preloaded in both.",
        },
    )


if __name__ == "__main__":
    main()
