"""kd_client/mirror.py's pure parts: which file paths a manifest from Redis may name, how files are
chunked, the size limit, and the Redis key names (no Redis here; the transfers: tests/integration)."""

from __future__ import annotations

import pytest

from jobs.errors import SecurityError, TransferError
from jobs.models import pub_blob_key, pub_current_key, pub_key_types
from kd_client import mirror
from kd_worker.settings import WorkerSettings

SHA = "ab" * 32


@pytest.mark.parametrize(
    "rel", ["adapters.safetensors", "adapter_config.json", "checkpoint_100/adapters.safetensors", "a/b/c/d.bin"]
)
def test_the_publishers_own_file_names_are_accepted(rel):
    assert "/".join(mirror.file_parts(rel)) == rel


@pytest.mark.parametrize(
    "rel",
    [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "./a",
        ".hidden",
        "a/.staging-1/x",
        "manifest.json",
        "a\\b",
        "a/b/c/d/e",
        "",
        "x\x00y",
        "é.bin",
        "-rf",
        "a/",
        5,
        None,
    ],
)
def test_paths_that_could_leave_the_version_or_hide_in_it_are_refused(rel):
    with pytest.raises(SecurityError):
        mirror.file_parts(rel)


@pytest.mark.parametrize(
    "size, chunks",
    [(0, []), (1, [1]), (mirror.CHUNK_BYTES, [mirror.CHUNK_BYTES]), (mirror.CHUNK_BYTES + 5, [mirror.CHUNK_BYTES, 5])],
)
def test_files_are_cut_into_full_chunks_then_the_rest(size, chunks):
    assert mirror.chunk_sizes(size) == chunks
    assert sum(mirror.chunk_sizes(size)) == size


def test_the_size_limit_counts_every_file_of_the_version():
    manifest = {"files": {"a.bin": {"sha256": SHA, "size": 600}, "b/c.bin": {"sha256": SHA, "size": 400}}}
    assert mirror.manifest_files(manifest, 1000) == {"a.bin": (SHA, 600), "b/c.bin": (SHA, 400)}
    with pytest.raises(TransferError, match="1001 bytes, over KD_MAX_ADAPTER_BYTES=1000"):
        mirror.manifest_files({"files": {**manifest["files"], "d.bin": {"sha256": SHA, "size": 1}}}, 1000)


@pytest.mark.parametrize(
    "files",
    [
        {"a.bin": {"sha256": "nothex", "size": 1}},
        {"a.bin": {"sha256": SHA, "size": -1}},
        {"a.bin": {"size": 1}},
        {"a.bin": "x"},
        ["a.bin"],
    ],
)
def test_a_malformed_manifest_is_a_transfer_error(files):
    with pytest.raises(TransferError):
        mirror.manifest_files({"files": files}, 1 << 30)


def test_key_names_and_types():
    assert pub_blob_key(SHA) == f"kd:pub:blob:{SHA}" and pub_current_key("memory") == "kd:pub:current:memory"
    assert pub_key_types("memory")["kd:pub:versions:memory"] == "hash"


@pytest.mark.parametrize("to, where", [("local", "adapters"), ("both", "adapters"), ("redis", "work/published")])
def test_the_worker_publishes_where_publish_to_says(tmp_path, to, where):
    s = WorkerSettings(adapters_dir=tmp_path / "adapters", work_dir=tmp_path / "work", publish_to=to)
    assert s.publish_root == tmp_path / where
