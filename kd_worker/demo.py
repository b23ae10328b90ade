"""`kd-worker demo`: the whole product on an embedded default, as a user would run it.

Builds the tiny demo models, starts a real redis-server with the shipped launchd/redis.conf
(unless KD_REDIS_URL points at a live one), starts `kd-worker run`, submits the bundled
`memory` prompts with `kd-client submit --wait` (live progress), then shows the published
adapter, kd_summary.json, a before/after table and the loss curve (terminal + PNG), and stops
what it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jobs import publisher
from jobs.errors import ConfigError, KDError
from kd_worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
SPARK = "▁▂▃▄▅▆▇█"


def venv_bin(name: str) -> str:
    """An executable of this virtualenv (kd-worker, kd-client)."""
    return str(Path(sys.executable).parent / name)


def child_env(**kd: str) -> dict[str, str]:
    """The environment of a worker/client we start: ours without KD_* (set explicitly), JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KD_")}
    env.update(PYTHONUNBUFFERED="1", KD_LOG_FORMAT="json", **kd)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_alive(url: str) -> bool:
    import redis

    from kd_worker.cli import redis_answers

    return redis_answers(redis.Redis.from_url(url, socket_connect_timeout=1))


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise KDError(f"demo: timed out waiting for {what}")
        time.sleep(0.1)  # polling a readiness condition


@contextlib.contextmanager
def managed_redis(settings: WorkerSettings, workdir: Path, explicit_url: bool) -> Iterator[str]:
    """The configured Redis if it answers; otherwise a real redis-server we start and stop."""
    if explicit_url and _redis_alive(settings.redis_url):
        yield settings.redis_url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigError("redis-server is not installed; run `make setup` (or scripts/setup.sh)")
    port, data = _free_port(), workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, str(REPO / "launchd" / "redis.conf"), "--port", str(port), "--dir", str(data),
                             "--daemonize", "no", "--logfile", str(data / "redis.log")])
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(lambda: _redis_alive(url), 20, "redis-server to start")
        print(f"• started redis-server on {url} (config launchd/redis.conf, data {data})")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def managed_worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "ab") as log:
        offset = log.tell()  # a second demo appends: only this run's lines count
        proc = subprocess.Popen([venv_bin("kd-worker"), "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: b'"worker_started"' in log_path.read_bytes()[offset:] or proc.poll() is not None, 120,
                  "the worker to load its teacher")
            if proc.poll() is not None:
                raise KDError(f"the worker exited ({proc.returncode}); see {log_path}")
            print(f"• worker started (pid {proc.pid}, log {log_path})")
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    pts = [sum(values[i : i + step]) / len(values[i : i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(SPARK[int((v - lo) / (hi - lo + 1e-12) * (len(SPARK) - 1))] for v in pts)


def plot_png(metrics: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in metrics["train"]]
    for key in ("loss", "kd", "ce"):
        ax.plot(steps, [r[key] for r in metrics["train"]], label=f"train {key}", alpha=0.8)
    ax.plot([r["step"] for r in metrics["val"]], [r["total"] for r in metrics["val"]], "o-", label="val total")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("kd-daemon demo: memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(adapters: Path, workdir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    version = publisher.resolve(adapters, "memory")
    metrics = json.loads((version.path / publisher.METRICS).read_text())
    console = Console()
    console.print(f"\n[bold]published[/] memory v{version.number}: {version.path}")
    console.print(f"  adapters_kd/memory/{publisher.POINTER} -> versions/{version.name}  "
                  f"(files: {', '.join(sorted(p.name for p in version.path.iterdir()))})")
    table = Table(title="held-out, before -> after training")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="right")
    for key, label in (("kl", "KL(teacher||student), T=1"), ("ce", "CE on teacher tokens"), ("top1", "top-1 agreement")):
        table.add_row(label, f"{metrics['before'][key]:.4f}", f"{metrics['after'][key]:.4f}")
    console.print(table)
    losses = [r["loss"] for r in metrics["train"]]
    console.print(f"train loss {losses[0]:.3f} {sparkline(losses)} {losses[-1]:.3f}")
    png = plot_png(metrics, workdir / "loss_memory.png")
    if png:
        console.print(f"loss curve: {png}")
    console.print(f"kd_summary.json: {adapters / publisher.SUMMARY}")


def run_demo(settings: WorkerSettings, workdir: Path, iterations: int, explicit_url: bool) -> int:
    from kd_worker.tinymodels import build_demo_models

    workdir.mkdir(parents=True, exist_ok=True)
    models = build_demo_models(workdir / "models", ("teacher", "student"))
    print(f"• demo models in {workdir / 'models'} (teacher: Qwen2-shaped, student: smaller Qwen2, one tokenizer)")
    with managed_redis(settings, workdir, explicit_url) as url:
        env = child_env(KD_REDIS_URL=url, KD_TEACHER=str(models["teacher"]), KD_STUDENT=str(models["student"]),
                        KD_WORK_DIR=str(workdir / "work"), KD_ADAPTERS_DIR=str(settings.adapters_dir.resolve()),
                        KD_SPOOL_DIR=str(workdir / "spool"), KD_WORKER_NAME=f"demo@{os.getpid()}")
        with managed_worker(env, workdir / "worker.log"):
            cmd = [venv_bin("kd-client"), "submit", "--domain", "memory", "--prompts",
                   str(REPO / "jobs" / "samples" / "memory.jsonl"), "--set", f"iterations={iterations}",
                   "--set", f"val_every={max(1, iterations // 4)}", "--set", f"save_every={max(1, iterations // 2)}",
                   "--wait"]
            print("• $ kd-client " + " ".join(cmd[1:]))
            code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        print(f"kd-client exited {code}; see {workdir / 'worker.log'}", file=sys.stderr)
        return code
    report(settings.adapters_dir, workdir)
    return 0
