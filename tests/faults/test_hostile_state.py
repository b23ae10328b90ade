"""Hostile state in Redis and on disk (issue 13): what an operator with write access to Redis or to
adapters_kd/ can do, carelessly or on purpose. Jobs come in shaped exactly like kd-client's and then
changed (rq callbacks, webhooks, meta, raw hash fields), links and folders are planted in adapters_kd/,
cached files are edited, Redis keys hold the wrong type.

One worker serves the module (KD_KEEP_VERSIONS=1: every publish prunes, so a prune that follows a
link shows). Each case has its own domain; `bystander` is published first and must never change.
After every case, `Unharmed.check` (faultkit): the worker is alive, the domain still takes jobs,
nothing outside KD_ADAPTERS_DIR changed, no other domain's files changed."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultkit import QUICK, Unharmed, current_version, enqueue_like_client, submit
from helpers import SAMPLES, WorkerProcess, connect, kd_client, row, wait_for, wait_status, worker_env
from rq.callbacks import Callback
from rq.webhook import Webhook

from jobs import publisher
from jobs.models import blob_key
from kd_client import queue as Q

SETTLED = {"finished", "failed", "stopped", "canceled"}
GOOD = json.dumps({"prompt": "What should be remembered about this user?"}).encode() + b"\n"
DEEP = 100_000  # nesting far past Python's recursion limit
PROBE = '''"""Imported or called only if the worker resolves a callable named by a job."""
import os
from pathlib import Path

_DIR = Path(os.environ["PROBE_DIR"])
(_DIR / "imported").touch()


def hit(*args, **kwargs):
    (_DIR / "called").touch()
'''


@dataclass
class Scene:
    env: dict[str, str]
    conn: Any
    worker: WorkerProcess
    adapters: Path
    outside: Path
    probe: Path

    def unharmed(self, domain: str) -> Unharmed:
        return Unharmed(self.env, self.worker, domain)

    def settle(self, job_id: str) -> dict[str, Any]:
        return wait_status(self.conn, job_id, SETTLED)


@pytest.fixture(scope="module")
def scene(tmp_path_factory, models_root, redis_server):
    redis_server.client().flushall()
    tmp = tmp_path_factory.mktemp("hostile")
    outside, probe = tmp / "outside", tmp / "probe"
    outside.mkdir()
    (outside / "user.txt").write_text("the user's own file\n")
    (probe / "lib").mkdir(parents=True)
    (probe / "lib" / "kd_probe.py").write_text(PROBE)
    env = worker_env(
        tmp,
        models_root,
        redis_server.url,
        "0.5",
        KD_WORKER_NAME="kd-hostile",
        KD_KEEP_VERSIONS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(probe / "lib"), os.environ.get("PYTHONPATH")])),
        PROBE_DIR=str(probe),
    )
    w = WorkerProcess(env, tmp / "worker.log").start()
    s = Scene(env, connect(env), w, Path(env["KD_ADAPTERS_DIR"]), outside, probe)
    assert (
        s.settle(submit(env, "bystander", prompts=[SAMPLES / "debug.jsonl"], overrides=QUICK))["status"] == "finished"
    )
    yield s
    w.stop()
    assert "unhandled exception" not in (tmp / "worker.log").read_text()


def failed_with(st: dict[str, Any], error: str, says: str) -> None:
    assert st["status"] == "failed", st
    assert st["error"].split(":")[0].endswith(error) and says in st["error"], st["error"]


# --- 1. publishing never follows a planted link ----------------------------------------------------
def test_a_versions_link_out_of_adapters_kd_is_never_followed(scene):
    d = scene.adapters / "links_out"
    d.mkdir(parents=True)
    store = scene.outside / "store"
    for n in (1, 2, 3):
        (store / f"{n:04d}").mkdir(parents=True)
        (store / f"{n:04d}" / "notes.txt").write_text(f"the user's notes {n}\n")
    (d / "versions").symlink_to(store, target_is_directory=True)
    guard = scene.unharmed("links_out")
    job = submit(scene.env, "links_out", prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
    failed_with(scene.settle(job), "SecurityError", "versions")
    guard.check(repair=lambda: (d / "versions").unlink())


def test_a_versions_link_into_another_domain_is_never_followed(scene):
    d = scene.adapters / "links_other"
    d.mkdir(parents=True)
    (d / "versions").symlink_to("../bystander/versions", target_is_directory=True)
    guard = scene.unharmed("links_other")
    job = submit(scene.env, "links_other", prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
    failed_with(scene.settle(job), "SecurityError", "versions")
    guard.check(repair=lambda: (d / "versions").unlink())


def test_a_current_link_into_another_domain_is_not_a_published_version(scene):
    """Readers see nothing published; the publish gate does not compare against the other domain's
    adapter; the next publish replaces the pointer."""
    d = scene.adapters / "current_other"
    scene.unharmed("current_other").check()  # v1 of its own
    (d / ".planted").symlink_to(f"../bystander/versions/{current_version(scene.adapters, 'bystander'):04d}")
    os.replace(d / ".planted", d / publisher.POINTER)
    assert publisher.resolve(scene.adapters, "current_other") is None
    guard = scene.unharmed("current_other")
    job = submit(scene.env, "current_other", prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
    st = scene.settle(job)
    assert st["status"] == "finished" and st["outcome"]["published"], st
    assert "published_version" not in st["outcome"]["gate"], st["outcome"]["gate"]  # not compared with bystander
    assert os.readlink(d / publisher.POINTER) == f"versions/{st['outcome']['version']:04d}"
    guard.check()


# --- 2. rq side channels: callbacks, webhooks, compressed data --------------------------------------
@pytest.mark.parametrize("option", ["on_success", "on_failure", "on_stopped"])
def test_a_callback_named_by_a_job_is_never_imported_or_called(scene, option):
    domain = f"callback_{option.removeprefix('on_')}"
    guard = scene.unharmed(domain)
    job = enqueue_like_client(scene.env, domain, GOOD, **{option: Callback("kd_probe.hit")})
    failed_with(scene.settle(job), "SecurityError", "callback")
    assert not list(scene.probe.glob("imported")) and not list(scene.probe.glob("called"))
    guard.check()


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(f"GET {self.path}")
        self.send_response(204)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.seen.append(f"POST {self.path} {self.headers.get('X-Planted')}")
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_named_by_a_job_is_never_sent(scene):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        guard = scene.unharmed("webhook")
        hooks = [Webhook(url, status, method="POST", headers={"X-Planted": "1"}) for status in ("finished", "failed")]
        job = enqueue_like_client(scene.env, "webhook", GOOD, webhooks=hooks)
        failed_with(scene.settle(job), "SecurityError", "webhook")
        guard.check()
        assert Recorder.seen == []
    finally:
        server.shutdown()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_compressed_job_data_is_refused_before_it_is_inflated(scene):
    """768 MB of zeros compress to under 1 MB; the worker must not inflate them to find out."""
    z = zlib.compressobj(9)
    bomb = b"".join(z.compress(bytes(1 << 20)) for _ in range(768)) + z.flush()
    assert len(bomb) < 1 << 20
    guard = scene.unharmed("bomb")
    wait_for(lambda: json.loads(scene.conn.get("kd:health:kd-hostile") or "{}").get("state") == "idle")
    before = peak_rss(scene.worker.proc.pid)
    job = enqueue_like_client(scene.env, "bomb", GOOD, raw={"data": bomb})
    failed_with(scene.settle(job), "SecurityError", "data")
    assert peak_rss(scene.worker.proc.pid) - before < 256 << 20  # the bomb would add 768 MB
    guard.check()


# --- 4. a malformed rq field ends the job, not the worker -------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("result_ttl", "not-a-number"), ("created_at", "yesterday"), ("retries_left", "many"), ("timeout", "1h")],
)
def test_a_malformed_rq_field_fails_the_job_and_the_worker_lives_on(scene, field, value):
    domain = f"malformed_{field}"
    guard = scene.unharmed(domain)
    job = enqueue_like_client(scene.env, domain, GOOD, raw={field: value})
    refused = lambda: [e for e in scene.worker.events("job_refused") if e.get("job_id") == job]  # noqa: E731
    wait_for(refused, what="the refusal")  # until then rq (and so kd-client status) cannot read the job
    failed_with(scene.settle(job), "ConfigError", field)
    guard.check()


# --- 5. tickets and meta from Redis ------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, meta, says",
    [
        ("huge_ticket", None, "ticket 1000000000000000"),
        ("other_domain", {"ticket": 1, "domain": "bystander", "submitter": "hostile"}, "domain"),
        ("extra_field", {"ticket": 1, "submitter": "hostile", "run_as": "root"}, "run_as"),
    ],
)
def test_forged_meta_cannot_block_a_domain(scene, case, meta, says):
    """A huge ticket (in meta and in the active set) would make every later job of the domain
    'superseded'; meta is what kd-client writes, nothing else."""
    domain = f"meta_{case}"
    guard = scene.unharmed(domain)
    if meta is None:
        job = enqueue_like_client(scene.env, domain, GOOD, ticket=10**15)
    else:
        job = enqueue_like_client(scene.env, domain, GOOD, meta={"domain": domain, **meta})
    failed_with(scene.settle(job), "ConfigError", says)
    guard.check()


# --- 3. cancel is scoped to one run -----------------------------------------------------------------
def test_a_canceled_job_runs_when_it_is_submitted_again(scene):
    guard = scene.unharmed("cancel")
    over = {**QUICK, "iterations": 60, "save_every": 60}
    job = submit(scene.env, "cancel", prompts=[SAMPLES / "task.jsonl"], overrides=over)
    wait_for(lambda: ((row(scene.conn, job) or {}).get("progress") or {}).get("phase") == "train", 120, 0.02)
    assert Q.cancel(scene.conn, job) == "stopping"
    assert scene.settle(job)["status"] == "stopped"
    again = submit(scene.env, "cancel", prompts=[SAMPLES / "task.jsonl"], overrides=over)
    assert again == job  # the same content-hash id
    st = scene.settle(again)
    assert st["status"] == "finished" and st["outcome"]["published"], st
    guard.check()


# --- 6. version folders are numbers ---------------------------------------------------------------
@pytest.mark.parametrize("stray", ["9", "9999", "²"])
def test_version_folders_are_numbered_as_integers_and_strays_are_ignored(scene, stray):
    domain = "numbers_" + {"9": "nine", "9999": "past9999", "²": "superscript"}[stray]
    d = scene.adapters / domain / "versions"
    (d / stray).mkdir(parents=True)
    guard = scene.unharmed(domain)
    job = submit(scene.env, domain, prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
    st = scene.settle(job)
    assert st["status"] == "finished" and st["outcome"]["version"] == (10000 if stray == "9999" else 1), st
    out = kd_client(scene.env, "rollback", "--domain", domain)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "nothing to roll back" in out.stderr, out.stderr
    st = guard.check()  # the next version after it
    assert st["outcome"]["version"] == (10001 if stray == "9999" else 2)


# --- 7. a failure after the pointer swap tells the truth ----------------------------------------------
def test_a_failure_after_the_pointer_swap_says_the_version_is_current(scene):
    """The summary is held (its lock) until `current` has moved, then made unwritable (a directory
    where the file must be): the error says v1 is current; once writable, it is repaired."""
    summary = scene.adapters / publisher.SUMMARY
    guard = scene.unharmed("after_swap")
    with publisher.locked(scene.adapters / f".{publisher.SUMMARY}.lock"):
        job = submit(scene.env, "after_swap", prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
        wait_for(lambda: current_version(scene.adapters, "after_swap") == 1, 120, what="the pointer swap")
        saved = summary.read_bytes()
        summary.unlink()
        summary.mkdir()
    st = scene.settle(job)
    failed_with(st, "PublishError", "after_swap v1 is current")
    assert "publish failed" not in st["error"] and "failed after staging" not in st["error"]

    def repair() -> None:
        summary.rmdir()
        summary.write_bytes(saved)  # still naming the old state: repaired from the pointers

    guard.check(repair)


def test_an_invalid_summary_is_rebuilt_from_every_domain(scene):
    summary = scene.adapters / publisher.SUMMARY
    summary.write_text("{ not json")
    guard = scene.unharmed("summary")
    guard.check()
    rebuilt = publisher.read_summary(scene.adapters)["domains"]
    domains = [d.name for d in scene.adapters.iterdir() if d.is_dir() and not d.is_symlink()]
    published = {d: v.number for d in domains if (v := publisher.resolve(scene.adapters, d))}
    assert {k: rebuilt[k]["version"] for k in published} == published and "bystander" in published


# --- 9. smaller ones --------------------------------------------------------------------------------
def test_a_cached_data_file_edited_on_disk_is_not_used(scene, tmp_path):
    data = tmp_path / "cached.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"cached prompt {i}"}) + "\n" for i in range(6)))
    guard = scene.unharmed("cached")
    assert scene.settle(submit(scene.env, "cached", prompts=[data], overrides=QUICK))["status"] == "finished"
    (cached,) = Path(scene.env["KD_WORK_DIR"]).glob(f"data/*/{data.name}")
    os.chmod(cached, 0o644)
    cached.write_text('{"prompt": 123}\n')  # edited on disk: no longer the bytes of its sha256
    st = scene.settle(submit(scene.env, "cached", prompts=[data], overrides={**QUICK, "iterations": 3}))
    assert st["status"] == "finished" and st["outcome"]["published"], st
    assert cached.read_bytes() == data.read_bytes()
    guard.check()


@pytest.mark.parametrize(
    "field, value", [("schema_version", "99"), ("force_publish", "yes"), ("schema_version", 1.0), ("records", "1")]
)
def test_payload_fields_are_not_coerced(scene, field, value):
    domain = f"strict_{field}_{type(value).__name__}"
    guard = scene.unharmed(domain)
    payload: dict[str, Any] = {field: value}
    if field == "records":
        blob = {"sha256": hashlib.sha256(GOOD).hexdigest(), "size": len(GOOD)}
        payload = {"data": [{"kind": "prompts", "records": value, "name": "x.jsonl", **blob}]}
    job = enqueue_like_client(scene.env, domain, GOOD, payload=payload)
    failed_with(scene.settle(job), "ConfigError", field)
    guard.check()


def test_deeply_nested_json_is_a_clean_error_for_kd_client_and_the_worker(scene, tmp_path):
    deep = b'{"prompt": "x", "meta": ' + b"[" * DEEP + b"]" * DEEP + b"}\n"
    path = tmp_path / "deep.jsonl"
    path.write_bytes(deep)
    guard = scene.unharmed("deep")
    out = kd_client(scene.env, "submit", "--domain", "deep", "--prompts", str(path))
    assert out.returncode == 1 and "DataError" in out.stderr and "nested" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr
    failed_with(scene.settle(enqueue_like_client(scene.env, "deep", deep)), "DataError", "nested")
    n = 5000  # past Python's recursion limit, within the data's size limit
    payload = b'["kd_worker.daemon.task.run_kd_job", null, [], {"payload": ' + b'{"a":' * n + b"1" + b"}" * n
    job = enqueue_like_client(scene.env, "deep", GOOD, raw={"data": zlib.compress(payload + b"}]")})
    failed_with(scene.settle(job), "SecurityError", "nested")
    guard.check()


def test_a_data_file_padded_past_the_limit_is_refused_by_kd_client(scene, tmp_path):
    path = tmp_path / "padded.jsonl"
    path.write_bytes(GOOD + b" \n" * 4096)  # one record, 8 KB of blank lines
    guard = scene.unharmed("padded")
    out = kd_client(dict(scene.env, KD_MAX_DATA_BYTES="4096"), "submit", "--domain", "padded", "--prompts", str(path))
    assert out.returncode == 1 and "exceeds KD_MAX_DATA_BYTES" in out.stderr, (out.stdout, out.stderr[-2000:])
    guard.check()


def test_a_client_key_of_the_wrong_type_is_a_typed_error(scene):
    scene.conn.hset("kd:seq:wrongtype", "planted", "1")
    guard = scene.unharmed("wrongtype")
    out = kd_client(scene.env, "submit", "--domain", "wrongtype", "--prompts", str(SAMPLES / "memory.jsonl"))
    assert out.returncode == 1 and "StateError" in out.stderr and "kd:seq:wrongtype" in out.stderr, out.stderr
    assert "WRONGTYPE" not in out.stderr
    guard.check(repair=lambda: scene.conn.delete("kd:seq:wrongtype"))


@pytest.mark.parametrize("key", ["published", "active", "blob"])
def test_a_worker_key_of_the_wrong_type_is_a_typed_error(scene, key):
    domain = f"wrongtype_{key}"
    data = json.dumps({"prompt": f"a key of the wrong type: {key}"}).encode() + b"\n"
    name = blob_key(hashlib.sha256(data).hexdigest()) if key == "blob" else f"kd:{key}:{domain}"

    def plant(pipe) -> None:
        pipe.delete(name)
        if key == "blob":
            pipe.hset(name, "planted", "1")
        else:
            pipe.rpush(name, "planted")

    guard = scene.unharmed(domain)
    job = enqueue_like_client(scene.env, domain, data, also=plant)
    failed_with(scene.settle(job), "StateError", name)
    assert "WRONGTYPE" not in row(scene.conn, job)["error"]
    guard.check(repair=lambda: scene.conn.delete(name))


def test_a_queue_key_of_the_wrong_type_does_not_end_the_worker(scene):
    """The worker pops from kd:high, kd, kd:low at once: one of them a hash fails every pop."""
    guard = scene.unharmed("queue_key")
    scene.conn.hset("rq:queue:kd:low", "planted", "1")
    job = submit(scene.env, "queue_key", prompts=[SAMPLES / "memory.jsonl"], overrides=QUICK)
    assert scene.settle(job)["status"] == "finished"  # popped from kd before kd:low is looked at
    wait_for(lambda: scene.worker.events("queue_key_wrong_type"), 60, what="the worker reporting the key")
    guard.check(repair=lambda: scene.conn.delete("rq:queue:kd:low"))
