"""kd_client/mirror.py against a real redis-server, two simulated hosts in one process: host B
publishes into its own adapters dir and pushes; host A mirrors into another. No shared files, no
MLX: the files are plain bytes (the worker processes and real adapters: test_multihost.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest
import redis
from helpers import wait_for

from jobs import publisher
from jobs.errors import PublishError, SecurityError, StateError, TransferError
from jobs.models import (
    PUB_DOMAINS_KEY,
    PUB_REFS_KEY,
    pub_blob_key,
    pub_current_key,
    pub_seq_key,
    pub_versions_key,
)
from kd_client import mirror
from kd_client.watcher import AdapterWatcher

SMALL_CHUNK = 1000  # several chunks per file without megabytes of test data


@pytest.fixture
def conn(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def hosts(tmp_path) -> tuple[Path, Path]:
    return tmp_path / "b" / "adapters_kd", tmp_path / "a" / "adapters_kd"


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(mirror, "CHUNK_BYTES", SMALL_CHUNK)


def writer(tag: int, weights: int = 2500):
    """A version's files; every byte names the tag. The weights span several small chunks, and the
    checkpoint repeats them (a blob shared inside one version)."""

    def write(stage: Path) -> None:
        body = (f"weights-{tag}-".encode() * weights)[:weights]
        (stage / "adapters.safetensors").write_bytes(body)
        (stage / "adapter_config.json").write_text(json.dumps({"num_layers": 2, "tag": tag}))
        (stage / "kd_metrics.json").write_text(json.dumps({"tag": tag}))
        (stage / "checkpoint_10").mkdir()
        (stage / "checkpoint_10" / "adapters.safetensors").write_bytes(body)

    return write


def publish_on_b(conn, b: Path, tag: int, domain: str = "memory", keep: int = 5) -> publisher.Version:
    """What the worker does inside the publish order: reserve the number, publish locally, push."""
    held = publisher.versions(b, domain)
    first = mirror.reserve_number(conn, domain, (held[-1].number if held else 0) + 1)
    version = publisher.publish(b, domain, writer(tag), {"tag": tag}, keep=keep, first_number=first)
    mirror.push(conn, version, keep, 1 << 30)
    return version


def snapshot(version_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(version_dir)): p.read_bytes() for p in sorted(version_dir.rglob("*")) if p.is_file()}


def hidden(root: Path, domain: str = "memory") -> list[str]:
    """Staging debris a failed install could leave."""
    d = root / domain
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".staging")) if d.is_dir() else []


def test_a_pushed_version_is_installed_on_another_host_exactly(conn, hosts, small_chunks):
    b, a = hosts
    v1 = publish_on_b(conn, b, 1)
    result = mirror.sync_domain(conn, a, "memory")
    assert (result.action, result.version) == ("installed", 1)
    mine = publisher.resolve(a, "memory")
    assert mine.number == 1 and snapshot(mine.path) == snapshot(v1.path)  # manifest.json byte for byte too
    assert publisher.verify(mine.path)["summary"]["tag"] == 1
    assert publisher.read_summary(a)["domains"]["memory"]["version"] == 1
    assert (a / "memory" / "adapters.safetensors").read_bytes() == (v1.path / "adapters.safetensors").read_bytes()
    assert mirror.sync_domain(conn, a, "memory").action == "current"  # nothing downloaded twice
    # the layout in Redis: one pointer, one record, every blob counted once per version
    pointer = json.loads(conn.get(pub_current_key("memory")))
    manifest = (v1.path / publisher.MANIFEST).read_bytes()
    assert pointer == {"version": 1, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    record = mirror.read_record(conn, "memory", 1)
    assert len(record.files["adapters.safetensors"]) == 3  # 2500 bytes in chunks of 1000
    assert record.files["adapters.safetensors"] == record.files["checkpoint_10/adapters.safetensors"]
    assert {k.decode(): int(v) for k, v in conn.hgetall(PUB_REFS_KEY).items()} == {s: 1 for s in record.blobs}
    assert all(conn.ttl(pub_blob_key(s)) == -1 for s in record.blobs)  # committed blobs never expire


def test_a_consumer_started_late_catches_up_to_the_newest_version(conn, hosts, small_chunks):
    b, a = hosts
    for tag in (1, 2, 3):
        newest = publish_on_b(conn, b, tag)
    assert mirror.sync_domain(conn, a, "memory").version == 3
    assert [v.number for v in publisher.versions(a, "memory")] == [3]  # the newest, not the history
    assert snapshot(publisher.resolve(a, "memory").path) == snapshot(newest.path)
    publish_on_b(conn, b, 4)
    assert mirror.sync_domain(conn, a, "memory").version == 4


def test_a_rollback_in_redis_reaches_the_consumer(conn, hosts, small_chunks):
    b, a = hosts
    for tag in (1, 2):
        publish_on_b(conn, b, tag)
    mirror.sync_domain(conn, a, "memory")
    assert mirror.move_pointer(conn, "memory") == (2, 1)
    result = mirror.sync_domain(conn, a, "memory")  # A never held v1: installed
    assert (result.action, publisher.resolve(a, "memory").number) == ("installed", 1)
    assert mirror.move_pointer(conn, "memory", to=2) == (1, 2)
    assert mirror.sync_domain(conn, a, "memory").action == "pointed"  # held here: pointed to, not downloaded
    assert publisher.resolve(a, "memory").number == 2
    with pytest.raises(PublishError, match=r"retained versions: \[1, 2\]"):
        mirror.move_pointer(conn, "memory", to=7)
    publish_on_b(conn, b, 3)  # after a rollback the next version is numbered past every retained one
    assert mirror.sync_domain(conn, a, "memory").version == 3


@pytest.mark.parametrize("publish_to, moves_redis", [("local", False), ("both", True), ("redis", True)])
def test_the_dashboards_rollback_moves_the_history_consumers_follow(conn, hosts, small_chunks, publish_to, moves_redis):
    """kd-client rollback and the dashboard share mirror.rollback: with KD_PUBLISH_TO=redis|both a local-only
    rollback would be undone by the next sync, so the pointer in Redis moves and consumers follow."""
    from starlette.testclient import TestClient

    from kd_client.dashboard.app import create_app
    from kd_client.settings import ClientSettings

    b, a = hosts
    for tag in (1, 2):
        publish_on_b(conn, b, tag)
    mirror.sync_domain(conn, a, "memory")
    settings = ClientSettings(adapters_dir=b, dashboard_token="a-long-dashboard-token", publish_to=publish_to)
    base = "http://127.0.0.1:8741"
    c = TestClient(create_app(settings, conn=conn), base_url=base)
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/domains/memory").text).group(1)
    r = c.post(
        "/domains/memory/rollback",
        data={"to": "1", "token": "a-long-dashboard-token", "csrf": csrf},
        headers={"origin": base, "sec-fetch-site": "same-origin"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/domains/memory?rolled_back=1"
    assert mirror.read_pointer(conn, "memory").version == (1 if moves_redis else 2)
    assert publisher.resolve(b, "memory").number == (2 if publish_to == "redis" else 1)  # redis-only: B's dir stays
    mirror.sync_domain(conn, a, "memory")
    assert publisher.resolve(a, "memory").number == (1 if moves_redis else 2)


def test_redis_keeps_the_newest_versions_and_only_their_blobs(conn, hosts, small_chunks):
    b, _ = hosts
    for tag in (1, 2, 3, 4):
        publish_on_b(conn, b, tag, keep=2)
    assert sorted(int(k) for k in conn.hkeys(pub_versions_key("memory"))) == [3, 4]
    live = {s for n in (3, 4) for s in mirror.read_record(conn, "memory", n).blobs}
    stored = {k.decode().rsplit(":", 1)[1] for k in conn.scan_iter(pub_blob_key("*"))}
    assert stored == live  # every blob of v1 and v2 is gone
    assert {k.decode() for k in conn.hkeys(PUB_REFS_KEY)} == live


def test_blobs_shared_by_versions_and_domains_live_while_one_references_them(conn, hosts, small_chunks):
    b, a = hosts
    publisher.publish(b, "memory", writer(1), {}, first_number=1)
    publisher.publish(b, "task", writer(1), {}, first_number=1)  # the same weights in another domain
    for domain in ("memory", "task"):
        mirror.push(conn, publisher.resolve(b, domain), 1, 1 << 30)
    weights = mirror.read_record(conn, "memory", 1).files["adapters.safetensors"]
    assert weights == mirror.read_record(conn, "task", 1).files["adapters.safetensors"]
    assert int(conn.hget(PUB_REFS_KEY, weights[0])) == 2
    publish_on_b(conn, b, 2, keep=1)  # memory v1 pruned: its weights stay for task
    assert int(conn.hget(PUB_REFS_KEY, weights[0])) == 1 and conn.exists(pub_blob_key(weights[0]))
    assert mirror.sync_domain(conn, a, "task").action == "installed"


def test_an_older_version_pushed_late_stays_current_and_is_not_pruned(conn, hosts, small_chunks):
    """A retry that finds its version already published here pushes it (it may have died before the
    push); the script never prunes the version it just made current."""
    b, a = hosts
    late = publisher.publish(b, "memory", writer(1), {}, first_number=mirror.reserve_number(conn, "memory", 1))
    for tag in (2, 3):
        publish_on_b(conn, b, tag)
    mirror.push(conn, late, 2, 1 << 30)
    assert sorted(int(k) for k in conn.hkeys(pub_versions_key("memory"))) == [1, 2, 3]
    assert json.loads(conn.get(pub_current_key("memory")))["version"] == 1
    mirror.move_pointer(conn, "memory", to=3)
    mirror.push(conn, late, 2, 1 << 30)  # pushed already: left as it is, the pointer untouched
    assert json.loads(conn.get(pub_current_key("memory")))["version"] == 3
    assert mirror.sync_domain(conn, a, "memory").version == 3


def test_two_hosts_publishing_one_domain_share_one_numbering(conn, tmp_path, small_chunks):
    b1, b2, a = tmp_path / "b1", tmp_path / "b2", tmp_path / "a"
    assert publish_on_b(conn, b1, 1).number == 1
    assert publish_on_b(conn, b2, 2).number == 2  # b2's own directory is empty: its number comes from Redis
    assert publish_on_b(conn, b1, 3).number == 3
    assert mirror.sync_domain(conn, a, "memory").version == 3
    tags = {n: publisher.verify(publisher.resolve(a, "memory").path)["summary"]["tag"] for n in (3,)}
    assert tags == {3: 3}
    assert int(conn.get(pub_seq_key("memory"))) == 3
    # a version numbered elsewhere cannot replace a pushed one
    clash = publisher.publish(tmp_path / "b3", "memory", writer(9), {"tag": 9})
    with pytest.raises(PublishError, match="already holds another v1"):
        mirror.push(conn, clash, 5, 1 << 30)


def corrupt(conn, kind: str) -> None:
    """Damage the current version of memory in Redis the way `kind` says."""
    pointer = mirror.read_pointer(conn, "memory")
    record = mirror.read_record(conn, "memory", pointer.version)
    chunk = pub_blob_key(record.files["adapters.safetensors"][1])
    if kind == "truncated":
        conn.set(chunk, conn.get(chunk)[:-10])
    elif kind == "tampered":
        data = bytearray(conn.get(chunk))
        data[5] ^= 1
        conn.set(chunk, bytes(data))
    elif kind == "missing":
        conn.delete(chunk)
    elif kind == "oversized":
        conn.append(chunk, b"x" * 10)
    elif kind == "manifest":
        key = pub_blob_key(pointer.manifest_sha256)
        conn.set(key, conn.get(key).replace(b'"tag": 2', b'"tag": 7'))
    elif kind == "record":
        doc = json.loads(conn.hget(pub_versions_key("memory"), pointer.version))
        doc["files"]["extra.bin"] = doc["files"]["kd_metrics.json"]
        conn.hset(pub_versions_key("memory"), pointer.version, json.dumps(doc))
    elif kind == "chunks":  # a chunk list one short: the file would be truncated
        doc = json.loads(conn.hget(pub_versions_key("memory"), pointer.version))
        doc["files"]["adapters.safetensors"].pop()
        conn.hset(pub_versions_key("memory"), pointer.version, json.dumps(doc))
    elif kind == "pointer":
        conn.set(pub_current_key("memory"), b'{"version": "2", "manifest_sha256": "x"}')


@pytest.mark.parametrize(
    "kind, error",
    [
        ("truncated", TransferError),
        ("tampered", TransferError),
        ("missing", TransferError),
        ("oversized", TransferError),
        ("manifest", TransferError),
        ("record", TransferError),
        ("chunks", TransferError),
        ("pointer", StateError),
    ],
)
def test_a_corrupt_or_partial_transfer_is_never_installed(conn, hosts, small_chunks, kind, error):
    b, a = hosts
    publish_on_b(conn, b, 1)
    mirror.sync_domain(conn, a, "memory")
    before = snapshot(a / "memory" / "versions" / "0001")
    publish_on_b(conn, b, 2)
    corrupt(conn, kind)
    with pytest.raises(error):
        mirror.sync_domain(conn, a, "memory")
    assert publisher.resolve(a, "memory").number == 1  # the old version keeps serving
    assert [v.number for v in publisher.versions(a, "memory")] == [1] and hidden(a) == []
    assert snapshot(a / "memory" / "versions" / "0001") == before
    assert publisher.read_summary(a)["domains"]["memory"]["version"] == 1
    if kind != "pointer":  # the next good version installs
        publish_on_b(conn, b, 3)
        assert mirror.sync_domain(conn, a, "memory").version == 3


def test_the_size_limit_applies_before_anything_is_downloaded(conn, hosts, small_chunks):
    b, a = hosts
    publish_on_b(conn, b, 1)
    with pytest.raises(TransferError, match="over KD_MAX_ADAPTER_BYTES=1000"):
        mirror.sync_domain(conn, a, "memory", max_bytes=1000)
    assert publisher.resolve(a, "memory") is None and hidden(a) == []
    with pytest.raises(TransferError, match="over KD_MAX_ADAPTER_BYTES"):
        mirror.push(conn, publisher.resolve(b, "memory"), 5, 1000)


def plant(conn, files: dict[str, bytes], domain: str = "memory", version: int = 1) -> None:
    """A version written straight into Redis, as a hostile writer could, with `files` as its content."""
    entries = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}
    manifest = json.dumps({"domain": domain, "version": version, "files": entries, "summary": {}}).encode()
    msha = hashlib.sha256(manifest).hexdigest()
    conn.set(pub_blob_key(msha), manifest)
    for d in files.values():
        conn.set(pub_blob_key(hashlib.sha256(d).hexdigest()), d)
    chunks = {rel: [hashlib.sha256(d).hexdigest()] if d else [] for rel, d in files.items()}
    record = {"manifest_sha256": msha, "files": chunks, "blobs": [msha], "size": 1}
    conn.hset(pub_versions_key(domain), version, json.dumps(record))
    conn.set(pub_current_key(domain), json.dumps({"version": version, "manifest_sha256": msha}))
    conn.sadd(PUB_DOMAINS_KEY, domain)


@pytest.mark.parametrize(
    "rel", ["../outside.txt", "/tmp/abs.txt", "checkpoint_1/../../x", ".hidden", "a//b", "manifest.json", "a\\b"]
)
def test_nothing_from_redis_is_written_outside_the_adapters_dir(conn, tmp_path, rel):
    a = tmp_path / "a"
    plant(conn, {"adapters.safetensors": b"w", rel: b"evil"})
    with pytest.raises(SecurityError):
        mirror.sync_domain(conn, a, "memory")
    assert {p.name for p in tmp_path.iterdir()} <= {"a"} and not (tmp_path / "outside.txt").exists()
    assert publisher.resolve(a, "memory") is None and hidden(a) == []


def test_a_planted_link_in_the_consumers_directory_is_refused(conn, tmp_path):
    a, elsewhere = tmp_path / "a", tmp_path / "elsewhere"
    plant(conn, {"adapters.safetensors": b"w"})
    a.mkdir()
    elsewhere.mkdir()
    (a / "memory").symlink_to(elsewhere)
    with pytest.raises(SecurityError):
        mirror.sync_domain(conn, a, "memory")
    assert list(elsewhere.iterdir()) == []
    os.unlink(a / "memory")
    (a / "memory").mkdir()
    (a / "memory" / "versions").symlink_to(elsewhere)
    with pytest.raises(SecurityError):
        mirror.sync_domain(conn, a, "memory")
    assert list(elsewhere.iterdir()) == []


def test_a_hostile_domain_name_in_redis_is_skipped(conn, tmp_path, hosts, small_chunks):
    b, a = hosts
    publish_on_b(conn, b, 1)
    conn.sadd(PUB_DOMAINS_KEY, "../etc", "Memory")
    results = mirror.Mirror(conn, a).sync_once()
    assert [(r.domain, r.action) for r in results] == [("memory", "installed")]


def test_a_version_of_the_same_number_from_elsewhere_is_a_conflict_not_an_overwrite(conn, hosts, small_chunks):
    b, a = hosts
    publish_on_b(conn, b, 1)
    own = publisher.publish(a, "memory", writer(5), {"tag": 5})  # A also gets versions from elsewhere
    before = snapshot(own.path)
    with pytest.raises(StateError, match="a directory of its own"):
        mirror.sync_domain(conn, a, "memory")
    assert snapshot(own.path) == before


def test_a_failed_version_is_retried_later_not_on_every_pass(conn, hosts, small_chunks, monkeypatch):
    b, a = hosts
    publish_on_b(conn, b, 1)
    corrupt(conn, "tampered")
    calls = []
    real = mirror.apply_pointer
    monkeypatch.setattr(mirror, "apply_pointer", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = mirror.Mirror(conn, a, retry_s=3600)
    assert [r.action for r in m.sync_once()] == ["failed"]
    assert [r.action for r in m.sync_once()] == ["failed"] and len(calls) == 1  # not downloaded again
    publish_on_b(conn, b, 2)  # the pointer moved on: tried at once
    assert [(r.action, r.version) for r in m.sync_once()] == [("installed", 2)] and len(calls) == 2


def test_follow_wakes_on_a_publish_without_waiting_for_the_poll(conn, hosts, small_chunks):
    """poll_s is an hour: only the PUBLISH of the push script can wake the mirror."""
    b, a = hosts
    m = mirror.Mirror(conn, a, ["memory"], poll_s=3600)
    passes: list[list[mirror.SyncResult]] = []
    stop = threading.Event()
    thread = threading.Thread(target=m.follow, args=(stop, passes.append), daemon=True)
    thread.start()
    try:
        wait_for(lambda: passes, 10, what="the first pass")
        publish_on_b(conn, b, 1)
        wait_for(lambda: publisher.resolve(a, "memory"), 10, what="v1 installed on A")
        mirror.move_pointer(conn, "memory", to=1)  # a rollback publishes too (nothing to do here)
        publish_on_b(conn, b, 2)
        wait_for(lambda: publisher.resolve(a, "memory").number == 2, 10, what="v2 installed on A")
        mirror.move_pointer(conn, "memory", to=1)  # A holds v1: pointed to, not downloaded
        wait_for(lambda: any(r.action == "pointed" for p in passes for r in p), 10, what="the rollback on A")
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert publisher.resolve(a, "memory").number == 1


def test_a_watcher_with_a_mirror_reports_each_version_from_redis(conn, hosts, small_chunks):
    b, a = hosts
    publish_on_b(conn, b, 1)
    with AdapterWatcher(a, ["memory"], mirror=mirror.Mirror(conn, a, ["memory"], poll_s=0.2)) as w:
        first = wait_for(lambda: w.take(0.2), 15, what="v1 reported")
        assert [(u.domain, u.version) for u in first] == [("memory", 1)]
        publish_on_b(conn, b, 2)
        second = wait_for(lambda: w.take(0.2), 15, what="v2 reported")
        assert [(u.version, u.path) for u in second] == [(2, (a / "memory" / "versions" / "0002").resolve())]
        mirror.move_pointer(conn, "memory")
        back = wait_for(lambda: w.take(0.2), 15, what="the rollback reported")
        assert [u.version for u in back] == [1]
    with pytest.raises(ValueError, match="not into the watched"):
        AdapterWatcher(a / "other", mirror=mirror.Mirror(conn, a))


def test_a_push_that_dies_before_its_commit_leaves_nothing_visible_or_kept(conn, hosts, small_chunks):
    b, a = hosts
    publish_on_b(conn, b, 1)
    v2 = publisher.publish(b, "memory", writer(2), {}, first_number=mirror.reserve_number(conn, "memory", 2))
    sources = {
        c: src
        for rel, m in publisher.verify(v2.path)["files"].items()
        for c, src in mirror._chunk(v2.path, rel, m["sha256"], m["size"])
    }
    manifest = (v2.path / publisher.MANIFEST).read_bytes()
    mirror._upload_missing(conn, v2.path, sources, manifest, hashlib.sha256(manifest).hexdigest())  # then the kill
    assert mirror.read_pointer(conn, "memory").version == 1 and mirror.read_record(conn, "memory", 2) is None
    fresh = [s for s in sources if conn.ttl(pub_blob_key(s)) > 0]
    assert fresh and all(0 < conn.ttl(pub_blob_key(s)) <= mirror.PENDING_TTL_S for s in fresh)  # they expire
    assert mirror.sync_domain(conn, a, "memory").version == 1
    mirror.push(conn, v2, 5, 1 << 30)  # the retry: everything is kept now
    assert all(conn.ttl(pub_blob_key(s)) == -1 for s in mirror.read_record(conn, "memory", 2).blobs)


def test_a_consumer_following_waits_out_a_redis_restart(tmp_path, hosts, small_chunks):
    from helpers import RedisServer

    b, a = hosts
    server = RedisServer(tmp_path / "redis").start()
    try:
        conn = server.client()
        publish_on_b(conn, b, 1)
        m = mirror.Mirror(redis.Redis.from_url(server.url, socket_timeout=2), a, ["memory"], poll_s=0.2)
        stop = threading.Event()
        thread = threading.Thread(target=m.follow, args=(stop, lambda results: None), daemon=True)
        thread.start()
        wait_for(lambda: publisher.resolve(a, "memory"), 15, what="v1 on A")
        server.stop()
        server.start()  # same port, empty (no persistence): B pushes its history again
        conn = server.client()
        publish_on_b(conn, b, 2)
        wait_for(
            lambda: getattr(publisher.resolve(a, "memory"), "number", 0) == 2, 30, what="v2 on A after the restart"
        )
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        server.stop()


def test_a_push_to_a_full_redis_fails_saying_so_and_changes_nothing(tmp_path, hosts, monkeypatch):
    from helpers import RedisServer

    b, _ = hosts
    monkeypatch.setattr(mirror, "CHUNK_BYTES", 1 << 20)
    server = RedisServer(tmp_path / "redis").start()
    try:
        conn = server.client()
        conn.config_set("maxmemory", 4 << 20)  # noeviction (the shipped policy): writes are refused when full
        big = publisher.publish(
            b, "memory", lambda s: (s / "adapters.safetensors").write_bytes(os.urandom(8 << 20)), {}
        )
        with pytest.raises(PublishError, match="Redis is full"):
            mirror.push(conn, big, 5, 1 << 30)
        assert mirror.read_pointer(conn, "memory") is None and mirror.read_record(conn, "memory", 1) is None
    finally:
        server.stop()
