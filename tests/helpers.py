"""Test helpers: wait on conditions (never bare sleeps), a real redis-server, worker processes,
job state read straight from Redis, the engine run in-process."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from jobs import publisher
from jobs.models import health_key
from kd_client import queue as Q
from kd_worker.fixtures.demo import child_env, venv_bin  # noqa: F401 (venv_bin: the same executables the demo starts)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "jobs" / "samples"
SHIPPED_REDIS_CONF = REPO / "launchd" / "redis.conf"
FAST = {"iterations": 20, "gen_max_tokens": 24, "val_every": 10, "save_every": 10, "batch_size": 4}  # KD_KD_DEFAULTS


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval of a condition wait, not a guess at a duration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port (and a unix socket), owned by the test suite."""

    def __init__(self, workdir: Path, password: str | None = None, config: Path | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run `make setup` (or scripts/setup.sh)")
        self.exe, self.workdir, self.password = exe, Path(workdir), password
        self.config = config  # a redis.conf (e.g. the shipped launchd/redis.conf): its bind/AOF/eviction rule
        self.port = free_port()
        self.socket = self.workdir / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket}{auth}"

    def start(self) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--logfile",
            str(self.workdir / "redis.log"),
        ]
        if self.config is not None:  # the file's own bind, persistence and eviction rules apply
            args = [
                self.exe,
                str(self.config),
                "--port",
                str(self.port),
                "--dir",
                str(self.workdir),
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--daemonize",
                "no",
                "--logfile",
                str(self.workdir / "redis.log"),
            ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=20, what=f"redis-server on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None


def kd_env(**extra: str) -> dict[str, str]:
    return child_env(**extra)


def worker_env(
    tmp_path: Path, models_root: Path, redis_url: str, heartbeat_interval: str, **extra: str
) -> dict[str, str]:
    """Environment for worker and client processes: real Redis, tiny models, small jobs; `extra`
    KD_* variables override (e.g. KD_WORKER_NAME, KD_MODELS_ROOT)."""
    return kd_env(
        **{
            "KD_REDIS_URL": redis_url,
            "KD_TEACHER": str(models_root / "teacher"),
            "KD_STUDENT": str(models_root / "student"),
            "KD_MODELS_ROOT": str(models_root),
            "KD_WORK_DIR": str(tmp_path / "work"),
            "KD_ADAPTERS_DIR": str(tmp_path / "adapters_kd"),
            "KD_SPOOL_DIR": str(tmp_path / "spool"),
            "KD_KD_DEFAULTS": json.dumps(FAST),
            "KD_HEARTBEAT_INTERVAL": heartbeat_interval,
            "KD_WORKER_NAME": f"test-{tmp_path.name}",
            **extra,
        }
    )


# --- job state read straight from Redis: kd_client's `describe`, exactly what `kd-client status
# --json` prints, without a process start per poll --------------------------------------------------
def connect(env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(env["KD_REDIS_URL"], socket_connect_timeout=2, socket_timeout=10)


def row(conn: redis.Redis, job_id: str) -> dict[str, Any] | None:
    job = Q.fetch(conn, job_id)
    return None if job is None else Q.describe(job)


def wait_status(conn: redis.Redis, job_id: str, states: set[str], timeout: float = 180) -> dict[str, Any]:
    def settled():
        r = row(conn, job_id)
        return r if r and r["status"] in states else None

    return wait_for(settled, timeout, interval=0.1, what=f"job {job_id} in {sorted(states)}")


def wait_phase(
    conn: redis.Redis,
    job_id: str,
    phase: str,
    min_step: int = 0,
    since: float = 0.0,
    timeout: float = 180,
    interval: float = 0.01,
) -> dict[str, Any]:
    """Progress of the job once it reports `phase` (at `min_step` or later, written after the
    time `since`: a killed run's last progress stays in job.meta); polls Redis every 10 ms."""

    def there():
        p = (row(conn, job_id) or {}).get("progress") or {}
        fresh = p.get("updated_at", 0) >= since
        return p if fresh and p.get("phase") == phase and p.get("step", 0) >= min_step else None

    return wait_for(there, timeout, interval=interval, what=f"job {job_id} in phase {phase} (step >= {min_step})")


# --- the engine in-process (no Redis) ----------------------------------------------------------
def engine_settings(tmp: Path, **kw: Any):
    from kd_worker.settings import WorkerSettings

    return WorkerSettings(work_dir=tmp / "work", adapters_dir=tmp / "adapters_kd", **kw)


def distill(
    tmp: Path,
    models_root: Path,
    domain: str = "memory",
    data: tuple | None = None,
    *,
    teacher: str = "teacher",
    student: str = "student",
    overrides: dict | None = None,
    run_id: str = "r1",
    job_id: str | None = None,
    force_publish: bool = False,
    reuse_outcome: bool = False,
    settings=None,
    runtime=None,
    progress: Callable | None = None,
    should_stop: Callable | None = None,
    publish_guard: Callable = contextlib.nullcontext,
    remote: Any = None,
    corpus: Any = None,
    submitter: str = "kd-worker",
) -> dict[str, Any]:
    """One `run_job` (what `kd-worker distill` and the queue run) on the tiny models; `data` defaults
    to the domain's bundled sample prompts, `settings` to work/ and adapters_kd/ under `tmp`,
    `runtime` to a fresh one. `progress(p)` hears Progress events; `should_stop()` returns None,
    "cancel" or "shutdown". `corpus`: the domain's (kd_client.corpus.Corpus), as the queue task passes it."""
    from jobs.config import resolve_config
    from kd_worker.daemon.lifecycle import run_job
    from kd_worker.daemon.runtime import Runtime
    from kd_worker.engine.hooks import Hooks, Progress, Stop
    from kd_worker.engine.types import DistillRequest

    class TestHooks(Hooks):
        def on_progress(self, p: Progress) -> None:
            if progress is not None:
                progress(p)

        def should_stop(self) -> Stop | None:
            reason = should_stop() if should_stop is not None else None
            return Stop(reason) if reason else None

    s = settings or engine_settings(tmp)
    req = DistillRequest(
        domain,
        data or (("prompts", SAMPLES / f"{domain}.jsonl"),),
        models_root / teacher,
        models_root / student,
        run_id,
        job_id=job_id,
        force_publish=force_publish,
        submitter=submitter,
    )
    cfg = resolve_config(s.kd_defaults, overrides or {})
    return run_job(
        req, cfg, runtime or Runtime(s), s, TestHooks(), publish_guard, reuse_outcome, remote=remote, corpus=corpus
    )


class WorkerProcess:
    """`kd-worker run` as a real subprocess, its JSON log lines parsed for assertions."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.env, self.log_path, self.args = env, Path(log_path), args
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self.launch()
        self.wait_event("worker_started", timeout=60)
        return self

    def launch(self) -> "WorkerProcess":
        """Start the process without waiting for it to be ready (e.g. while Redis is still down)."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [venv_bin("kd-worker"), "run", *self.args], env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float = 60, count: int = 1) -> list[dict[str, Any]]:
        def seen():
            if self.proc is not None and self.proc.poll() is not None and len(self.events(name)) < count:
                raise RuntimeError(
                    f"worker exited ({self.proc.returncode}) before {name!r}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            evs = self.events(name)
            return evs if len(evs) >= count else None

        return wait_for(seen, timeout, what=f"worker event {name!r} x{count}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if hasattr(self, "_log"):
            self._log.close()


def kd_client(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("kd-client"), *args], env=env, capture_output=True, text=True, timeout=timeout)


# --- `kd-client serve` as a real process -------------------------------------------------------------
def preload_blas(env: dict[str, str]) -> dict[str, str]:
    """kd-client never imports the worker's BLAS loader: hand the child OpenBLAS as LD_PRELOAD."""
    from kd_worker.ops.blas import ensure_fast_blas

    lib = ensure_fast_blas().library
    return {**env, "LD_PRELOAD": lib} if lib and "openblas" in lib.lower() else env


class ServeProcess:
    """`kd-client serve` on a free loopback port; JSON over http.client, SSE read event by event."""

    def __init__(self, env: dict[str, str], log_path: Path, model: Path, adapters: Path, host: str = "127.0.0.1"):
        self.env, self.log_path, self.model, self.adapters, self.host = env, Path(log_path), model, adapters, host
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return [venv_bin("kd-client"), "serve", "--model", str(self.model), "--adapters", str(self.adapters),
                "--host", self.host, "--port", str(self.port)]  # fmt: skip

    def start(self, timeout: float = 120, headers: dict[str, str] | None = None) -> "ServeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kd-client serve exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                return self.request("GET", "/health", headers=headers, timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(up, timeout, interval=0.1, what=f"kd-client serve on port {self.port}")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, timeout: float = 120):
        import http.client

        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 120
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, parsed JSON body); `body` bytes are sent as they are."""
        conn = self.connect(timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else None
        finally:
            conn.close()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[2]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if hasattr(self, "_log"):
            self._log.close()


def sse_events(resp) -> Any:
    """The JSON payloads of an SSE response (http.client), up to `data: [DONE]`."""
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: ") :])


# --- published versions and queue state for the dashboard's tests --------------------------------
def metrics_doc(i: int, samples: int = 2) -> dict:
    return {
        "train": [{"step": s, "loss": 3.0 / s, "kd": 1.0 / s, "ce": 2.0 / s} for s in range(1, 11)],
        "val": [{"step": 0, "total": 2.0, "kl": 1.0}, {"step": 10, "total": 0.5, "kl": 0.5 / (i + 1)}],
        "before": {"kl": 1.0, "top1": 0.1},
        "after": {"kl": 0.5 / (i + 1), "top1": 0.8},
        "gate": {"decision": "publish", "reason": f"reason {i}"},
        "samples": [
            {"prompt": f"v{i} prompt {k}", "teacher": "8", "before": "3", "after": f"after {i}"} for k in range(samples)
        ],
    }


def publish_version(root: Path, domain: str, i: int, samples: int = 2) -> publisher.Version:
    doc = metrics_doc(i, samples)

    def write(stage: Path) -> None:
        (stage / publisher.METRICS).write_text(json.dumps(doc))
        (stage / publisher.WEIGHTS).write_bytes(b"weights %d" % i)

    entry = {
        "job_id": f"kd-{domain}-{i:020d}",
        "metrics": {"before": doc["before"], "after": doc["after"]},
        "gate": doc["gate"],
        "data": {"examples": 10 + i},
    }
    return publisher.publish(root, domain, write, entry)


def enqueue(conn, settings, domain: str, priority: str = "normal", n: int = 1) -> str:
    ds = Q.prepare_dataset("prompts", b'{"prompt": "p%d"}\n' % n, "p.jsonl", settings.max_data_bytes)
    return Q.submit(conn, settings, Q.build_job(domain, [ds], priority=priority), [ds]).job_id


def beat(conn, name: str, queues: list[str], shutting_down: bool = False) -> None:
    info = {"name": name, "state": "idle", "queues": queues, "at": time.time(), "shutting_down": shutting_down}
    conn.set(health_key(name), json.dumps(info), ex=30)
