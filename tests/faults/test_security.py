"""Who can make the worker do what: Redis with a password and over a unix socket, the shipped
redis.conf reachable from loopback only, paths built from job input confined to their roots,
and nothing the worker writes left world-writable. (Allow-list and pickle refusal: the corpus in
test_bad_inputs.py and tests/integration/test_daemon.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from faultkit import raw_enqueue, store_blob, submit, world_writable
from helpers import SAMPLES, SHIPPED_REDIS_CONF, RedisServer, connect, row, venv_bin, wait_status


def test_a_password_protected_redis_over_tcp_and_a_unix_socket(env, worker, tmp_path):
    server = RedisServer(tmp_path / "redis", password="kd-s3cret").start()
    try:
        assert server.unix_url.startswith("unix://") and "password=kd-s3cret" in server.unix_url
        w = worker(base=dict(env, KD_REDIS_URL=server.unix_url))  # the worker over the socket (perm 700)
        producer = dict(env, KD_REDIS_URL=server.url)  # the producer over TCP: redis://:PASSWORD@127.0.0.1:PORT/0
        job = submit(producer, "memory", prompts=[SAMPLES / "memory.jsonl"])
        assert wait_status(connect(producer), job, {"finished"})["outcome"]["published"]
        assert w.proc.poll() is None

        wrong = dict(env, KD_REDIS_URL=server.url.replace("kd-s3cret", "guess"), KD_WORKER_NAME="intruder")
        out = subprocess.run([venv_bin("kd-worker"), "run"], env=wrong, capture_output=True, text=True, timeout=120)
        assert out.returncode == 78 and "refused the credentials of KD_REDIS_URL" in out.stderr, out.stderr[-2000:]
        assert "guess" not in out.stderr  # the message names the variable, never echoes the credentials
        nopass = dict(env, KD_REDIS_URL=f"redis://127.0.0.1:{server.port}/0", KD_WORKER_NAME="intruder")
        out = subprocess.run([venv_bin("kd-worker"), "run"], env=nopass, capture_output=True, text=True, timeout=120)
        assert out.returncode == 78 and "KD_REDIS_URL" in out.stderr, out.stderr[-2000:]
    finally:
        server.stop()


def test_the_shipped_redis_config_listens_on_loopback_only(shipped_redis):
    text = SHIPPED_REDIS_CONF.read_text()
    binds = re.findall(r"^bind\s+(.+)$", text, flags=re.M)
    assert binds and all(addr in ("127.0.0.1", "::1", "-::1") for line in binds for addr in line.split())
    conf = {
        k: v
        for name in ("bind", "protected-mode", "appendonly", "appendfsync", "maxmemory-policy")
        for k, v in shipped_redis.client().config_get(name).items()
    }  # RedisServer adds no --bind with a config
    assert conf == {
        "bind": "127.0.0.1",
        "protected-mode": "yes",
        "appendonly": "yes",
        "appendfsync": "everysec",
        "maxmemory-policy": "noeviction",
    }


def test_paths_from_job_input_stay_confined_and_nothing_written_is_world_writable(env, worker, tmp_path):
    conn, adapters, work = connect(env), Path(env["KD_ADAPTERS_DIR"]), Path(env["KD_WORK_DIR"])
    outside = tmp_path / "outside"
    outside.mkdir()
    adapters.mkdir(parents=True)
    (adapters / "debug").symlink_to(outside, target_is_directory=True)  # a planted link out of adapters_kd/
    old = os.umask(0)  # the worker must not rely on its parent's umask
    try:
        w = worker()
    finally:
        os.umask(old)
    escaped = submit(env, "debug", prompts=[SAMPLES / "debug.jsonl"])
    data = (SAMPLES / "task.jsonl").read_bytes()
    ref = {"kind": "prompts", "records": 12, "name": "../../../../outside/evil.jsonl", **store_blob(conn, data)}
    traversal = raw_enqueue(conn, {"payload": {"domain": "task", "data": [ref]}})
    st = wait_status(conn, escaped, {"failed"})
    assert "SecurityError" in st["error"] and "resolves outside" in st["error"], st["error"]
    assert wait_status(conn, traversal, {"finished"})["outcome"]["published"]  # the file name was only a label
    assert list(outside.iterdir()) == []
    evil = list(work.parent.rglob("evil.jsonl"))
    assert len(evil) == 1 and evil[0].parent.parent == work / "data"  # work/data/<sha256>/evil.jsonl
    assert world_writable(work, adapters) == []
    assert oct(os.stat(adapters / "task" / "current" / "adapters.safetensors").st_mode & 0o777) == "0o644"
    assert json.loads((adapters / "kd_summary.json").read_text())["domains"].keys() == {"task"}
    assert row(conn, escaped)["status"] == "failed" and w.proc.poll() is None
