"""Test helpers: wait on conditions (never bare sleeps), a real redis-server, worker processes."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_worker.demo import child_env, venv_bin  # noqa: F401 (venv_bin: the same executables the demo starts)

REPO = Path(__file__).resolve().parents[1]
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

    def __init__(self, workdir: Path, appendonly: bool = False, password: str | None = None,
                 config: Path | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run `make setup` (or scripts/setup.sh)")
        self.exe, self.workdir, self.appendonly, self.password = exe, Path(workdir), appendonly, password
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
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--save", "",
                "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")]
        if self.config is not None:  # the file's own bind, persistence and eviction rules apply
            args = [self.exe, str(self.config), "--port", str(self.port), "--dir", str(self.workdir),
                    "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--daemonize", "no",
                    "--logfile", str(self.workdir / "redis.log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=20, what=f"redis-server on port {self.port}")
        return self

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def ping(self) -> bool:
        import redis

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
        self.proc = subprocess.Popen([venv_bin("kd-worker"), "run", *self.args], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        import json

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
                raise RuntimeError(f"worker exited ({self.proc.returncode}) before {name!r}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
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
