"""`kd-client` as a user types it (the installed executable, a real redis-server, real published
mlx-lm adapters): `rollback` (with and without `--to`), `list --state`, `workers`, `follow`, and
the exit code of each."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import SAMPLES, connect, kd_client, venv_bin, wait_for, wait_status
from lora_fixtures import lora_shapes, lora_weights, write_adapter
from safetensors.numpy import load_file

from jobs import publisher
from kd_client import queue as Q
from kd_client.api import KDClient
from kd_client.settings import ClientSettings

EXIT_OK, EXIT_FAILED = 0, 1


@pytest.fixture(scope="module")
def shapes(models_root):
    return lora_shapes(models_root / "student")


def publish(root: Path, shapes, tag: int) -> publisher.Version:
    return publisher.publish(root, "memory", lambda stage: write_adapter(stage, shapes, tag), {"tag": tag}, keep=10)


def linked_weights_tag(root: Path, shapes) -> int:
    """Which version's weights `adapters_kd/memory/adapters.safetensors` (mlx-lm's path) holds."""
    got = load_file(str(root / "memory" / "adapters.safetensors"))
    (tag,) = [t for t in range(1, 6) if all((got[k] == v).all() for k, v in lora_weights(shapes, t).items())]
    return tag


def test_rollback_by_one_and_to_a_version(env, shapes):
    root = Path(env["KD_ADAPTERS_DIR"])
    for tag in (1, 2, 3):
        publish(root, shapes, tag)

    out = kd_client(env, "rollback", "--domain", "memory")
    assert out.returncode == EXIT_OK, out.stderr
    assert out.stdout.startswith("memory: current is now v2 (") and publisher.resolve(root, "memory").number == 2
    assert linked_weights_tag(root, shapes) == 2

    out = kd_client(env, "rollback", "--domain", "memory", "--to", "1")
    assert out.returncode == EXIT_OK and "current is now v1" in out.stdout
    assert publisher.resolve(root, "memory").number == 1 and linked_weights_tag(root, shapes) == 1
    summary = json.loads(kd_client(env, "summary", "--json").stdout)["domains"]["memory"]
    assert summary["version"] == 1 and summary["rolled_back_from"] == 2

    out = kd_client(env, "rollback", "--domain", "memory")
    assert out.returncode == EXIT_FAILED and "v1 is the oldest kept version" in out.stderr and not out.stdout
    out = kd_client(env, "rollback", "--domain", "memory", "--to", "9")
    assert out.returncode == EXIT_FAILED and "memory has no version 9; kept versions: [1, 2, 3]" in out.stderr
    assert publisher.resolve(root, "memory").number == 1  # failed rollbacks changed nothing
    out = kd_client(env, "rollback", "--domain", "memory", "--to", "3")  # forward again, to a kept version
    assert out.returncode == EXIT_OK and publisher.resolve(root, "memory").number == 3

    out = kd_client(env, "rollback", "--domain", "nosuch")
    assert out.returncode == EXIT_FAILED and "nothing is published for 'nosuch'" in out.stderr
    out = kd_client(env, "rollback", "--domain", "../memory")
    assert out.returncode == EXIT_FAILED and "SecurityError" in out.stderr


def submit(env, domain: str, **kw) -> str:
    """Set-up, not under test: the job goes in through the client library (no process start)."""
    settings = ClientSettings(redis_url=env["KD_REDIS_URL"], spool_dir=Path(env["KD_SPOOL_DIR"]))
    prompts = [json.loads(line) for line in (SAMPLES / f"{domain}.jsonl").read_text().splitlines()]
    return KDClient(settings).submit(domain, prompts, overrides=TINY, **kw).job_id


def listed(env, *states: str) -> list[dict]:
    out = kd_client(env, "list", *(a for s in states for a in ("--state", s)), "--json")
    assert out.returncode == EXIT_OK, out.stderr
    return json.loads(out.stdout)


TINY = {"iterations": 2, "save_every": 2, "val_every": 2, "gen_max_tokens": 4}


def test_list_by_state_and_workers_before_and_during_work(env, worker):
    out = kd_client(env, "workers")
    assert out.returncode == EXIT_OK and out.stdout.strip() == "no live workers"

    broken = submit(env, "memory", teacher="no-such-teacher")  # fails in the worker
    fine = submit(env, "task")
    dropped = submit(env, "debug")
    conn = connect(env)
    assert Q.cancel(conn, dropped) == "canceled"
    table = kd_client({**env, "COLUMNS": "200"}, "list", "--state", "canceled", "--state", "failed")  # whole ids
    assert table.returncode == EXIT_OK and "kd jobs (1)" in table.stdout
    assert dropped in table.stdout and broken not in table.stdout and fine not in table.stdout  # queued: not shown

    w = worker(name="cli-worker")
    wait_for(lambda: Q.workers(conn), 30, what="the worker's health key")
    (row,) = json.loads(kd_client(env, "workers", "--json").stdout)
    assert row["name"] == "cli-worker" and row["pid"] == w.proc.pid and row["age_s"] < 30

    for job in (broken, fine):
        wait_status(conn, job, {"finished", "failed"})
    (failed,) = listed(env, "failed")
    assert failed["id"] == broken and "no-such-teacher" in failed["error"]
    assert {r["id"] for r in listed(env, "finished", "canceled")} == {fine, dropped}


class Lines:
    """A process's stdout lines, read on a thread, waited for with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for_line(self, prefix: str, timeout: float = 120) -> str:
        while True:
            try:
                line = self.q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no line starting {prefix!r}; saw {self.seen}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line


def test_follow_reports_the_current_version_then_a_swap(env, shapes, models_root):
    root = Path(env["KD_ADAPTERS_DIR"])
    publish(root, shapes, 1)
    args = ["follow", "--domain", "memory", "--model", str(models_root / "student"), "--prompt", "hi"]
    proc = subprocess.Popen(
        [venv_bin("kd-client"), *args, "--max-tokens", "4", "--max-swaps", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = Lines(proc)
        first = lines.wait_for_line("memory v")
        assert first.startswith("memory v1: swapped in ") and "of the full load" in first
        publish(root, shapes, 2)
        assert lines.wait_for_line("memory v").startswith("memory v2: swapped in ")
        assert proc.wait(60) == EXIT_OK  # --max-swaps 2: it ends by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    bad = kd_client(env, "follow", "--domain", "../etc", "--model", str(models_root / "student"), "--prompt", "hi")
    assert bad.returncode == EXIT_FAILED and "SecurityError" in bad.stderr
