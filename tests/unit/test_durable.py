"""jobs/durable.py: every flush to disk goes through one helper, which uses F_FULLFSYNC on darwin (plain fsync
does not empty the drive's cache there). Driven on Linux with a platform switch and a recorded fcntl."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import fakeredis
import pytest
from helpers import REPO

from jobs import durable, publisher
from kd_client.api import KDClient
from kd_client.settings import ClientSettings


class Flushes:
    """Records each flush by the path of the file or directory it flushed, and how (F_FULLFSYNC or fsync)."""

    def __init__(self, monkeypatch, platform: str, fullfsync_error: int | None = None):
        self.calls: list[tuple[str, Path]] = []
        self.fullfsync_error = fullfsync_error
        real_fsync = os.fsync
        monkeypatch.setattr(durable, "sys", SimpleNamespace(platform=platform))
        monkeypatch.setattr(durable, "fcntl", SimpleNamespace(fcntl=self._fcntl))

        def fsync(fd: int) -> None:
            self.calls.append(("fsync", self._path(fd)))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    @staticmethod
    def _path(fd: int) -> Path:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))

    def _fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        assert cmd == 51  # F_FULLFSYNC in <sys/fcntl.h>
        if self.fullfsync_error is not None:
            raise OSError(self.fullfsync_error, os.strerror(self.fullfsync_error))
        self.calls.append(("F_FULLFSYNC", self._path(fd)))
        return 0

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.calls}

    def shapes(self, root: Path) -> set[str]:
        """The flushed paths under `root`, random names (uuid hex) shown as *."""
        return {re.sub(r"[0-9a-f]{32}", "*", str(path.relative_to(root))) for _, path in self.calls}


def publish_one(root: Path) -> publisher.Version:
    def write(stage: Path) -> None:
        (stage / "adapters.safetensors").write_bytes(b"w" * 100)
        (stage / "adapter_config.json").write_text("{}")

    return publisher.publish(root, "memory", write, {"metrics": {"kl": 1.0}}, keep=5)


def test_publisher_flushes_every_file_and_directory_with_fullfsync_on_darwin(tmp_path, monkeypatch):
    flushes = Flushes(monkeypatch, "darwin")
    publish_one(tmp_path)
    assert flushes.kinds() == {"F_FULLFSYNC"}  # never a plain fsync on darwin
    assert {
        "memory/.staging-*/adapters.safetensors",  # the version's files, its manifest, its directory
        "memory/.staging-*/adapter_config.json",
        f"memory/.staging-*/.{publisher.MANIFEST}.*.tmp",
        "memory/.staging-*",
        "memory/versions",  # the rename into versions/
        "memory",  # the pointer swap
    } <= flushes.shapes(tmp_path)


def test_outbox_and_accumulated_corrections_use_fullfsync_on_darwin(tmp_path, monkeypatch):
    settings = ClientSettings(spool_dir=tmp_path / "spool", accumulate_threshold=2, accumulate_max_age_s=3600)
    kd = KDClient(settings, connection=fakeredis.FakeRedis())
    flushes = Flushes(monkeypatch, "darwin")
    kd.submit_corrections("memory", [{"prompt": "q?", "response": "a."}])
    assert flushes.calls == [("F_FULLFSYNC", tmp_path / "spool" / "accum" / "memory.jsonl")]
    kd.submit("memory", prompts=[{"prompt": "hello"}])  # spooled to the outbox before delivery
    outbox = [path for kind, path in flushes.calls[1:] if kind == "F_FULLFSYNC" and path.parent.name == "outbox"]
    assert outbox and flushes.kinds() == {"F_FULLFSYNC"}


def test_checkpoints_are_flushed_before_they_are_named(tmp_path, monkeypatch):
    import mlx.core as mx

    from kd_worker.engine.checkpoints import DirCheckpointStore

    flushes = Flushes(monkeypatch, "darwin")
    renamed: list[tuple[str, str]] = []
    real_rename = Path.rename
    monkeypatch.setattr(
        Path, "rename", lambda self, dst: renamed.append((self.name, len(flushes.calls))) or real_rename(self, dst)
    )
    store = DirCheckpointStore(tmp_path / "ckpt")
    store.save(3, {"adapter.w": mx.ones((2, 2))}, {"step": 3})
    assert flushes.kinds() == {"F_FULLFSYNC"}
    flushed = [path.name for _, path in flushes.calls]
    assert {"state.safetensors", "state.json"} <= set(flushed)
    stage = next(name for name in flushed if name.startswith(".step_0000003"))  # the staged directory itself
    assert renamed == [(stage, len(flushes.calls))]  # every flush happened before the rename
    assert store.latest()[0] == 3


def test_fullfsync_refused_by_the_file_system_falls_back_to_fsync(tmp_path, monkeypatch):
    flushes = Flushes(monkeypatch, "darwin", fullfsync_error=errno.ENOTSUP)
    publisher.write_bytes_atomic(tmp_path / "f", b"x")
    assert [kind for kind, _ in flushes.calls] == ["fsync"]


def test_off_darwin_it_is_plain_fsync(tmp_path, monkeypatch):
    flushes = Flushes(monkeypatch, "linux")
    publisher.write_json_atomic(tmp_path / "f.json", {"a": 1})
    assert flushes.kinds() == {"fsync"} and json.loads((tmp_path / "f.json").read_text()) == {"a": 1}


def test_no_flush_bypasses_the_helper():
    """A new os.fsync call site would not reach the drive on a Mac: every flush goes through jobs.durable."""
    offenders = []
    for package in ("jobs", "kd_client", "kd_worker"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "jobs" / "durable.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bos\.fsync\(|\bfsync\(\s*[a-z_.]*fileno", line) and "durable." not in line:
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_fsync_really_flushes_a_descriptor(tmp_path, platform, monkeypatch):
    # The real call on this machine (F_FULLFSYNC is absent here, so darwin falls back through OSError).
    monkeypatch.setattr(durable, "sys", SimpleNamespace(platform=platform))
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x")
        durable.fsync(f.fileno())
