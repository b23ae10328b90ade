"""More than one machine on one real redis-server: simulated hosts with separate adapters dirs,
work dirs, spools, model copies and worker names, and no shared files. Workers publish with
KD_PUBLISH_TO=both; host A runs no worker, only `kd-client sync --follow` into its own directory,
and a watcher + AdapterSlot there serve exactly what B's version would."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import redis
from helpers import SAMPLES, connect, kd_client, venv_bin, wait_for, wait_status, worker_env

from jobs import publisher
from jobs.models import pub_blob_key
from kd_client import mirror
from kd_client.hotswap import AdapterSlot
from kd_client.watcher import AdapterWatcher

PROMPT = "How important is it to remember the user's daughter's name?"


class Host:
    """One simulated machine: its own directory tree and KD_* environment."""

    def __init__(self, root: Path, models_root: Path, redis_url: str, name: str, **env: str):
        self.root, self.name = root / name, name
        self.models = self.root / "models"
        shutil.copytree(models_root, self.models, symlinks=True)  # no file shared with another host
        self.env = worker_env(
            self.root, self.models, redis_url, "1", KD_WORKER_NAME=f"kd-{name}", KD_SYNC_POLL_S="0.5", **env
        )
        self.adapters = Path(self.env["KD_ADAPTERS_DIR"])

    def version(self, number: int) -> Path:
        return self.adapters / "memory" / "versions" / f"{number:04d}"


@pytest.fixture
def host(tmp_path, models_root, redis_url):
    return lambda name, **env: Host(tmp_path, models_root, redis_url, name, **env)


class SyncProcess:
    """`kd-client sync --follow` on a host, its output lines readable while it runs."""

    def __init__(self, h: Host, *args: str):
        self.out = h.root / "sync.out"
        self._file = open(self.out, "wb")
        self.proc = subprocess.Popen(
            [venv_bin("kd-client"), "sync", "--follow", *args], env=h.env, stdout=self._file, stderr=subprocess.STDOUT
        )

    def lines(self) -> list[str]:
        return self.out.read_text(errors="replace").splitlines()

    def wait_line(self, text: str, timeout: float = 60) -> str:
        return wait_for(lambda: next((x for x in self.lines() if text in x), None), timeout, what=f"sync: {text!r}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._file.close()
        return code


@pytest.fixture
def syncs():
    started: list[SyncProcess] = []

    def start(h: Host, *args: str) -> SyncProcess:
        started.append(SyncProcess(h, *args))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=30)


def submit(h: Host, seed: int) -> str:
    out = kd_client(
        h.env,
        "submit",
        "--domain",
        "memory",
        "--prompts",
        str(SAMPLES / "memory.jsonl"),
        "--force",
        "--set",
        f"seed={seed}",
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def greedy_and_logits(model, tokenizer) -> tuple[list[int], np.ndarray]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=12)]
    return tokens, np.array(model(mx.array([ids]))[0, -1])


def as_b_serves(b: Host, number: int) -> tuple[list[int], np.ndarray]:
    return greedy_and_logits(*mlx_lm.load(str(b.models / "student"), adapter_path=str(b.version(number)))[:2])


def snapshot(version_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(version_dir)): p.read_bytes() for p in sorted(version_dir.rglob("*")) if p.is_file()}


def next_update(watcher: AdapterWatcher, version: int, timeout: float = 120):
    def got():
        return next((u for u in watcher.take(0.2) if u.version == version), None)

    return wait_for(got, timeout, what=f"the watcher on A to report v{version}")


def test_a_version_published_on_b_is_served_on_a_exactly_as_b_would(host, worker, syncs):
    b, a = host("b", KD_PUBLISH_TO="both"), host("a")
    worker(base=b.env)
    sync = syncs(a)
    model, tokenizer = mlx_lm.load(str(a.models / "student"))[:2]
    slot = AdapterSlot(model)
    conn = connect(b.env)
    with AdapterWatcher(a.adapters, ["memory"], debounce_ms=100, step_ms=20) as watcher:
        first = submit(a, seed=1)  # a consumer machine may submit too: the queue is in Redis
        assert wait_status(conn, first, {"finished"})["outcome"]["version"] == 1
        slot.apply(next_update(watcher, 1).path)
        assert snapshot(a.version(1)) == snapshot(b.version(1))  # same number, same bytes, manifest too
        tokens, logits = greedy_and_logits(model, tokenizer)
        expected_tokens, expected_logits = as_b_serves(b, 1)
        assert tokens == expected_tokens and np.array_equal(logits, expected_logits)

        second = submit(a, seed=2)
        assert wait_status(conn, second, {"finished"})["outcome"]["version"] == 2
        slot.apply(next_update(watcher, 2).path)
        assert greedy_and_logits(model, tokenizer)[0] == as_b_serves(b, 2)[0] != expected_tokens

        # a rollback on B (kd-client there, KD_PUBLISH_TO=both) moves B's directory and Redis; A follows
        out = kd_client(b.env, "rollback", "--domain", "memory")
        assert out.returncode == 0 and "now v1" in out.stdout, out.stderr
        assert publisher.resolve(b.adapters, "memory").number == 1
        slot.apply(next_update(watcher, 1).path)
        assert greedy_and_logits(model, tokenizer)[0] == expected_tokens
        sync.wait_line("memory: v1 is current again")

        # a tampered blob: pushed v3 whose weights Redis holds altered (same length) is refused on A
        v3 = publisher.publish(
            b.adapters,
            "memory",
            lambda stage: [
                shutil.copy(b.version(2) / f, stage / f) for f in ("adapters.safetensors", "adapter_config.json")
            ],
            {"tag": "v3"},
            first_number=mirror.reserve_number(conn, "memory", 3),
        )
        weights = (v3.path / "adapters.safetensors").read_bytes()[: mirror.CHUNK_BYTES]
        tampered = bytearray(weights)
        tampered[-1] ^= 0xFF
        conn.set(pub_blob_key(hashlib.sha256(weights).hexdigest()), bytes(tampered))
        mirror.push(conn, v3, 5, 1 << 30)
        sync.wait_line(f"memory: v{v3.number} not installed")
        assert publisher.resolve(a.adapters, "memory").number == 1 and not watcher.take(0.5)
        assert greedy_and_logits(model, tokenizer)[0] == expected_tokens  # A keeps serving v1
    assert sync.stop() == 0

    # a consumer that was offline all along catches up to the newest good version (v1 after the rollback)
    late = host("late")
    out = kd_client(late.env, "sync")
    assert out.returncode == 1 and "memory: v" in out.stdout  # v3 is refused: exit 1
    conn.delete(pub_blob_key(hashlib.sha256(weights).hexdigest()))  # ... until the blob is repaired
    assert mirror.push(conn, v3, 5, 1 << 30)["sent_bytes"] == len(weights)  # only the missing blob goes again
    assert conn.ttl(pub_blob_key(hashlib.sha256(weights).hexdigest())) == -1  # and it is kept for good
    out = kd_client(late.env, "sync")
    assert out.returncode == 0 and f"memory: v{v3.number} installed" in out.stdout, out.stdout + out.stderr
    assert snapshot(late.version(v3.number)) == snapshot(v3.path)


def test_two_workers_on_two_hosts_make_one_ordered_history(host, worker, syncs):
    """B publishes v1; then C, whose directory is empty, publishes: v2 (the number comes from Redis),
    warm-started from and gated against B's v1 (mirrored into C's directory first). A sees v1 then v2."""
    b, c, a = host("b", KD_PUBLISH_TO="both"), host("c", KD_PUBLISH_TO="redis"), host("a")
    sync = syncs(a)
    conn = connect(b.env)
    wb = worker(base=b.env)
    first = submit(b, seed=1)
    assert wait_status(conn, first, {"finished"})["outcome"]["version"] == 1
    sync.wait_line("memory: v1 installed")
    wb.signal(signal.SIGTERM)
    assert wb.wait(60) == 0
    worker(base=c.env)
    second = submit(c, seed=2)
    outcome = wait_status(conn, second, {"finished"})["outcome"]
    assert outcome["version"] == 2 and outcome["gate"]["published_version"] == 1
    c_root = c.root / "work" / "published"  # KD_PUBLISH_TO=redis: C's own copy, which no consumer reads
    assert not c.adapters.exists()
    assert [v.number for v in publisher.versions(c_root, "memory")] == [1, 2]
    assert snapshot(c_root / "memory" / "versions" / "0001") == snapshot(b.version(1))
    init = json.loads((c_root / "memory" / "versions" / "0002" / publisher.METRICS).read_text())["continual"]["init"]
    assert (init["used"], init["version"]) == ("current", 1)  # warm-started from B's v1, mirrored from Redis
    sync.wait_line("memory: v2 installed")
    assert [v.number for v in publisher.versions(a.adapters, "memory")] == [1, 2]
    jobs = [publisher.verify(a.version(n))["summary"]["job_id"] for n in (1, 2)]
    assert jobs == [first, second]
    assert snapshot(a.version(2)) == snapshot(c_root / "memory" / "versions" / "0002")
    installed = [x.split(":")[1].split()[0] for x in sync.lines() if "installed" in x]
    assert installed == ["v1", "v2"]
    assert sync.stop() == 0


@pytest.mark.slow
def test_two_workers_racing_on_two_hosts_publish_in_submission_order(host, worker, syncs):
    """The later job trains faster on C and waits for B's earlier one: v1 = B's, v2 = C's, on every host."""
    from helpers import wait_phase

    b, c, a = host("b", KD_PUBLISH_TO="both"), host("c", KD_PUBLISH_TO="both"), host("a")
    sync = syncs(a)
    conn = connect(b.env)
    worker(base=b.env)
    long = ["--set", "iterations=150", "--set", "save_every=10", "--set", "val_every=100000"]
    out = kd_client(b.env, "submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl"), "--force", *long)
    first = out.stdout.split()[0]
    wait_phase(conn, first, "train", min_step=1)
    worker(base=c.env)
    second = submit(c, seed=3)
    for job in (first, second):
        assert wait_status(conn, job, {"finished"}, timeout=600)["outcome"]["published"]
    sync.wait_line("memory: v2 installed", timeout=60)
    for root in (a.adapters, b.adapters, c.adapters):
        mirror.sync_domain(redis.Redis.from_url(a.env["KD_REDIS_URL"]), root, "memory")
        assert publisher.resolve(root, "memory").number == 2
        assert publisher.verify(root / "memory" / "versions" / "0002")["summary"]["job_id"] == second
    assert publisher.verify(a.version(1))["summary"]["job_id"] == first
    assert sync.stop() == 0


def test_a_retry_pushes_a_version_that_went_live_just_before_redis_was_lost(tmp_path, models_root, redis_url):
    """The worker's push fails (Redis lost) after its local publish: the job fails, the version is current
    on the worker only. The retry of the run finds its version (never published twice) and pushes it."""
    from helpers import FAST, distill, engine_settings

    from kd_worker.daemon.remote import RedisPublishing

    class Lost(RedisPublishing):
        def push(self, version: publisher.Version) -> None:
            raise redis.ConnectionError("Connection reset by peer")

    conn = redis.Redis.from_url(redis_url)
    settings = engine_settings(tmp_path, publish_to="both")
    run = {"settings": settings, "reuse_outcome": True, "overrides": {**FAST, "iterations": 4}}
    with pytest.raises(redis.ConnectionError):
        distill(tmp_path, models_root, remote=Lost(conn, settings), **run)
    assert publisher.resolve(settings.adapters_dir, "memory").number == 1
    assert mirror.read_pointer(conn, "memory") is None
    out = distill(tmp_path, models_root, remote=RedisPublishing(conn, settings), **run)
    assert out["version"] == 1 and [v.number for v in publisher.versions(settings.adapters_dir, "memory")] == [1]
    assert mirror.read_pointer(conn, "memory").version == 1
    assert mirror.sync_domain(conn, tmp_path / "consumer", "memory").action == "installed"


def test_serve_with_redis_as_its_source_serves_what_another_host_publishes(models_root, tmp_path, redis_url):
    """`KD_ADAPTERS_SOURCE=redis kd-client serve` on a host with an empty directory: the version pushed
    before it started is served from the first request, later ones and a rollback as they come."""
    from helpers import ServeProcess, kd_env, preload_blas
    from lora_fixtures import lora_shapes, write_adapter

    student, conn, b = models_root / "student", redis.Redis.from_url(redis_url), tmp_path / "b"
    shapes = lora_shapes(student)

    def publish_on_b(tag: int) -> publisher.Version:
        first = mirror.reserve_number(conn, "memory", 1)
        v = publisher.publish(b, "memory", lambda s: write_adapter(s, shapes, tag), {"tag": tag}, first_number=first)
        mirror.push(conn, v, 5, 1 << 30)
        return v

    def answer(server: ServeProcess) -> tuple[str, str]:
        body = {"model": "memory", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12}
        status, headers, out = server.request("POST", "/v1/chat/completions", body)
        assert status == 200, out
        return headers["x-kd-adapter"], out["choices"][0]["message"]["content"]

    def expected(version: publisher.Version) -> str:
        model, tok = mlx_lm.load(str(student), adapter_path=str(version.path))[:2]
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        return mlx_lm.generate(model, tok, ids, max_tokens=12)

    v1 = publish_on_b(1)
    env = preload_blas(kd_env(KD_REDIS_URL=redis_url, KD_ADAPTERS_SOURCE="redis", KD_SERVE_WATCH_DEBOUNCE_MS="50"))
    server = ServeProcess(env, tmp_path / "serve.log", student, tmp_path / "a" / "adapters_kd").start()
    try:
        assert answer(server) == ("memory/v1", expected(v1))
        v2 = publish_on_b(2)
        wait_for(lambda: server.health()["served"].get("memory") == 2, 60, what="memory v2 served")
        assert answer(server) == ("memory/v2", expected(v2)) and expected(v2) != expected(v1)
        mirror.move_pointer(conn, "memory")
        wait_for(lambda: server.health()["served"].get("memory") == 1, 60, what="the rollback served")
        assert answer(server) == ("memory/v1", expected(v1))
    finally:
        server.stop()
