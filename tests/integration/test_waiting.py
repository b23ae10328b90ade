"""A queued job with no worker, as a new user meets it: `kd-client submit --wait` and `watch` say
where the job stands and how to start a worker, and the dashboard's job page says the same.
A real Redis, no worker process; a worker's presence is its health key."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from helpers import SAMPLES, connect, kd_client, venv_bin, wait_for
from starlette.testclient import TestClient

from jobs.models import health_key
from kd_client import queue as Q
from kd_client.dashboard.app import create_app
from kd_client.settings import ClientSettings


class Lines:
    """A process's output lines, collected by a thread as they come."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, text: str, timeout: float = 60) -> str:
        def seen():
            return next((ln for ln in self.lines if text in ln), None)

        return wait_for(seen, timeout, what=f"{text!r} in the output; got {self.lines}")


@pytest.fixture
def waiting_cli(env):
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> Lines:
        proc = subprocess.Popen(
            [venv_bin("kd-client"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(proc)
        return Lines(proc)

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def beat(conn, name: str, queues: list[str]) -> None:
    info = {"name": name, "host": "h", "pid": 1, "state": "idle", "queues": queues, "at": time.time()}
    conn.set(health_key(name), json.dumps(info), ex=60)


def test_submit_wait_and_watch_say_where_a_queued_job_stands(env, waiting_cli):
    conn = connect(env)
    first = waiting_cli("submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl"), "--wait")
    job_id = first.wait("kd-memory-").strip()
    assert first.wait("waiting:") == "waiting: position 1 of 1 in kd; 0 live workers serve kd"
    hint = first.wait("no live worker")
    assert hint == (
        "no live worker serves queue kd: start one with `kd-worker run` (or as a service: `kd-worker service install`)"
    )
    second_id = kd_client(env, "submit", "--domain", "debug", "--prompts", str(SAMPLES / "debug.jsonl")).stdout.strip()
    second = waiting_cli("watch", second_id)
    assert second.wait("waiting:") == "waiting: position 2 of 2 in kd; 0 live workers serve kd"
    beat(conn, "elsewhere", ["other-queue"])  # serves another queue: does not count
    beat(conn, "w1", ["kd:high", "kd", "kd:low"])
    assert first.wait("1 live worker") == "waiting: position 1 of 2 in kd; 1 live worker serves kd"
    assert second.wait("1 live worker") == "waiting: position 2 of 2 in kd; 1 live worker serves kd"
    assert first.proc.poll() is None  # still waiting, as it should with nobody taking the job
    kd_client(env, "cancel", job_id)
    assert first.proc.wait(timeout=60) == 4  # EXIT_STOPPED: the wait ends with the job


def test_the_dashboard_job_page_says_the_same(env, tmp_path):
    ids = []
    for domain in ("memory", "debug"):
        out = kd_client(env, "submit", "--domain", domain, "--prompts", str(SAMPLES / f"{domain}.jsonl"))
        ids.append(out.stdout.strip())
    settings = ClientSettings(redis_url=env["KD_REDIS_URL"], adapters_dir=tmp_path / "adapters_kd")
    page = TestClient(create_app(settings), base_url="http://127.0.0.1:8741").get(f"/jobs/{ids[1]}").text
    assert "waiting: position 2 of 2 in kd; 0 live workers serve kd" in page
    assert "no live worker serves queue kd: start one with `kd-worker run`" in page.replace("&#96;", "`")
    assert Q.fetch(connect(env), ids[1]) is not None
