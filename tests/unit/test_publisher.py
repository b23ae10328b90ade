"""jobs/publisher.py: immutable versions, the pointer swap, links, manifest, summary, retention,
rollback, failures mid-publish and unsafe domains. Plain files, no mlx."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import publisher
from jobs.errors import PublishError, SecurityError

FILES = ("adapters.safetensors", "adapter_config.json", "kd_metrics.json")


def writer(tag: int, checkpoint: int | None = None):
    """A `write(stage)` callback: every file names its tag, so mixing versions would show."""

    def write(stage: Path) -> None:
        (stage / "adapters.safetensors").write_bytes(f"weights-{tag}".encode() * 100)
        (stage / "adapter_config.json").write_text(json.dumps({"num_layers": 2, "tag": tag}))
        (stage / "kd_metrics.json").write_text(json.dumps({"tag": tag}))
        if checkpoint is not None:
            (stage / f"checkpoint_{checkpoint}").mkdir()
            (stage / f"checkpoint_{checkpoint}" / "adapters.safetensors").write_bytes(b"ckpt")

    return write


def publish(root: Path, tag: int, domain: str = "memory", keep: int = 5, **kw) -> publisher.Version:
    return publisher.publish(root, domain, writer(tag, **kw), {"metrics": {"kl": 1.0 / tag}, "tag": tag}, keep=keep)


def snapshot(version_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(version_dir)): p.read_bytes() for p in sorted(version_dir.rglob("*")) if p.is_file()}


def visible(root: Path, domain: str = "memory") -> list[str]:
    """What a reader can stumble on: everything but the lock files."""
    d = root / domain
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock") and p.name != ".lock")


def test_publish_makes_an_immutable_verified_version_and_swaps_the_pointer(tmp_path):
    v1 = publish(tmp_path, 1)
    assert (v1.number, v1.path) == (1, tmp_path / "memory" / "versions" / "0001")
    assert os.readlink(tmp_path / "memory" / "current") == "versions/0001"
    manifest = publisher.verify(v1.path)
    assert set(manifest["files"]) == set(FILES)
    assert manifest["files"]["kd_metrics.json"]["size"] == (v1.path / "kd_metrics.json").stat().st_size
    before = snapshot(v1.path)

    v2 = publish(tmp_path, 2)
    assert publisher.resolve(tmp_path, "memory") == v2
    assert snapshot(v1.path) == before  # an older version is never touched
    assert json.loads((v2.path / "kd_metrics.json").read_text()) == {"tag": 2}
    assert not list((tmp_path / "memory").glob(".staging-*"))


def test_compat_links_give_the_seed_layout_of_the_current_version(tmp_path):
    publish(tmp_path, 1, checkpoint=10)
    d = tmp_path / "memory"
    for name in FILES + ("manifest.json", "checkpoint_10"):
        assert (d / name).is_symlink() and (d / name).exists(), name
    assert json.loads((d / "adapter_config.json").read_text())["tag"] == 1
    publish(tmp_path, 2)  # no checkpoint in v2: its link must not dangle
    assert json.loads((d / "adapter_config.json").read_text())["tag"] == 2
    assert (d / "adapters.safetensors").read_bytes() == (d / "versions" / "0002" / "adapters.safetensors").read_bytes()
    assert not (d / "checkpoint_10").is_symlink()


def test_verify_refuses_a_modified_truncated_or_malformed_version(tmp_path):
    v = publish(tmp_path, 1)
    (v.path / "kd_metrics.json").write_text(json.dumps({"tag": 9}))  # same size, other bytes
    with pytest.raises(PublishError, match="does not match its manifest"):
        publisher.verify(v.path)
    w = publish(tmp_path, 2)
    with open(w.path / "adapters.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(PublishError, match="does not match"):
        publisher.verify(w.path)
    x = publish(tmp_path, 3)
    (x.path / "manifest.json").write_text(json.dumps({"files": ["not", "a", "dict"]}))
    with pytest.raises(PublishError, match="malformed"):
        publisher.verify(x.path)


def test_summary_records_each_domain_and_its_history(tmp_path):
    publish(tmp_path, 1)
    publish(tmp_path, 2)
    publish(tmp_path, 7, domain="task")
    summary = publisher.read_summary(tmp_path)
    mem, task = summary["domains"]["memory"], summary["domains"]["task"]
    assert (mem["version"], mem["path"], mem["history"], mem["tag"]) == (2, "memory/versions/0002", [1, 2], 2)
    assert mem["metrics"] == {"kl": 0.5} and "published_at" in mem and "updated_at" in summary
    assert (task["version"], task["tag"]) == (1, 7)
    publisher.record_rejection(tmp_path, "memory", {"decision": "reject", "candidate_kl": 2.0, "published_kl": 1.0})
    mem = publisher.read_summary(tmp_path)["domains"]["memory"]
    assert mem["version"] == 2 and mem["last_rejected"]["candidate_kl"] == 2.0


COUNTER = """
import sys
from jobs import publisher
root, domain, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(n):
    publisher.update_summary(root, domain, lambda old: {**old, "n": old.get("n", 0) + 1})
"""


def test_summary_updates_from_several_processes_are_never_lost(tmp_path):
    # 4 writers x 25 read-modify-writes of the same entry: a missing lock loses increments.
    procs = [
        subprocess.Popen([sys.executable, "-c", COUNTER, str(tmp_path), d, "25"])
        for d in ("memory", "memory", "task", "task")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    domains = publisher.read_summary(tmp_path)["domains"]
    assert domains["memory"]["n"] == 50 and domains["task"]["n"] == 50
    assert not list(tmp_path.glob(".kd_summary.json.*.tmp"))


def test_retention_keeps_the_last_n_versions(tmp_path):
    for tag in range(1, 6):
        publish(tmp_path, tag, keep=3)
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [3, 4, 5]
    assert publisher.resolve(tmp_path, "memory").number == 5
    publisher.rollback(tmp_path, "memory", to=3)
    publish(tmp_path, 6, keep=1)
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [6]


def test_rollback_to_the_previous_or_a_named_version(tmp_path):
    for tag in (1, 2, 3):
        publish(tmp_path, tag)
    back = publisher.rollback(tmp_path, "memory")
    assert back.number == 2 and publisher.resolve(tmp_path, "memory").number == 2
    assert json.loads((tmp_path / "memory" / "kd_metrics.json").read_text()) == {"tag": 2}
    entry = publisher.read_summary(tmp_path)["domains"]["memory"]
    assert (entry["version"], entry["rolled_back_from"], entry["tag"]) == (2, 3, 2)
    assert publisher.rollback(tmp_path, "memory", to=3).number == 3
    assert publisher.rollback(tmp_path, "memory", to=1).number == 1
    with pytest.raises(PublishError, match="oldest"):
        publisher.rollback(tmp_path, "memory")


def test_rollback_refuses_missing_or_corrupt_versions_and_keeps_the_pointer(tmp_path):
    with pytest.raises(PublishError, match="nothing is published"):
        publisher.rollback(tmp_path, "memory")
    v1 = publish(tmp_path, 1)
    publish(tmp_path, 2)
    with pytest.raises(PublishError, match="no version 9"):
        publisher.rollback(tmp_path, "memory", to=9)
    (v1.path / "adapters.safetensors").write_bytes(b"bit rot")
    with pytest.raises(PublishError, match="does not match"):
        publisher.rollback(tmp_path, "memory")
    assert publisher.resolve(tmp_path, "memory").number == 2
    assert not [p for p in (tmp_path / "memory").iterdir() if p.name.startswith(".current.")]


def _fails_like(exc: BaseException):
    def write(stage: Path) -> None:
        writer(99)(stage)
        raise exc

    return write


@pytest.mark.parametrize(
    "exc, error",
    [
        (RuntimeError("serializer bug"), RuntimeError),
        (OSError(errno.ENOSPC, "No space left on device"), PublishError),
    ],
)
def test_a_failing_write_leaves_the_previous_version_and_no_debris(tmp_path, exc, error):
    publish(tmp_path, 1)
    before = visible(tmp_path)
    with pytest.raises(error) as info:
        publisher.publish(tmp_path, "memory", _fails_like(exc), {})
    if error is PublishError:
        assert "disk full" in str(info.value) and "previous version stays current" in str(info.value)
    assert publisher.resolve(tmp_path, "memory").number == 1
    assert visible(tmp_path) == before
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [1]
    assert publish(tmp_path, 2).number == 2  # and the next publish works


def _failing(monkeypatch, name: str, when) -> None:
    real = getattr(os, name)

    def fake(*args, **kwargs):
        if when(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(publisher.os, name, fake)


@pytest.mark.parametrize("step", ["fsync", "rename", "pointer"])
def test_a_failure_at_each_step_keeps_the_previous_version_current(tmp_path, monkeypatch, step):
    publish(tmp_path, 1)
    before = visible(tmp_path)
    snap = snapshot(tmp_path / "memory" / "versions" / "0001")
    if step == "fsync":
        _failing(monkeypatch, "fsync", lambda fd: True)
    elif step == "rename":
        _failing(monkeypatch, "rename", lambda src, dst: Path(src).name.startswith(".staging-"))
    else:
        _failing(monkeypatch, "replace", lambda src, dst: Path(dst).name == publisher.POINTER)
    with pytest.raises(PublishError, match="previous version stays current"):
        publish(tmp_path, 2)
    monkeypatch.undo()
    assert publisher.resolve(tmp_path, "memory").number == 1
    assert visible(tmp_path) == before
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [1]
    assert snapshot(tmp_path / "memory" / "versions" / "0001") == snap
    assert publisher.read_summary(tmp_path)["domains"]["memory"]["version"] == 1


def test_staging_debris_of_a_crashed_publish_is_cleaned_by_the_next(tmp_path):
    publish(tmp_path, 1)
    crashed = tmp_path / "memory" / ".staging-deadbeef"
    crashed.mkdir()
    (crashed / "adapters.safetensors").write_bytes(b"half")
    publish(tmp_path, 2)
    assert not crashed.exists()


@pytest.mark.parametrize("domain", ["../evil", "a/b", "", "Memory", ".hidden", "x" * 40, "/abs"])
def test_unsafe_domain_names_are_refused(tmp_path, domain):
    with pytest.raises(SecurityError):
        publisher.publish(tmp_path, domain, writer(1), {})
    with pytest.raises(SecurityError):
        publisher.rollback(tmp_path, domain)
    with pytest.raises(SecurityError):
        publisher.resolve(tmp_path, domain)
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("dangling", [False, True])
def test_a_domain_dir_linked_out_of_the_root_is_refused(tmp_path, dangling):
    root, outside = tmp_path / "adapters_kd", tmp_path / "outside"
    root.mkdir()
    if not dangling:
        outside.mkdir()
    os.symlink(outside, root / "memory")
    with pytest.raises(SecurityError, match="outside"):
        publisher.publish(root, "memory", writer(1), {})
    assert not outside.exists() or not any(outside.iterdir())


# --- planted state (issue 13): never follow a link the publisher did not create ----------------------
def tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else p.read_text()
    return out


@pytest.mark.parametrize("target", ["outside", "other"])
def test_a_planted_versions_link_is_refused_and_nothing_is_touched(tmp_path, target):
    root, outside = tmp_path / "adapters_kd", tmp_path / "outside"
    publish(root, 1, domain="task", keep=1)
    for n in (1, 2):
        (outside / f"{n:04d}").mkdir(parents=True)
        (outside / f"{n:04d}" / "notes").write_text("mine")
    (root / "memory").mkdir()
    (root / "memory" / "versions").symlink_to(outside if target == "outside" else root / "task" / "versions")
    before = tree(tmp_path)
    with pytest.raises(SecurityError, match="versions is a symbolic link"):
        publish(root, 2, keep=1)
    with pytest.raises(SecurityError):
        publisher.versions(root, "memory")
    assert publisher.resolve(root, "memory") is None
    assert tree(tmp_path) == before


def test_a_current_pointer_into_another_domain_is_not_a_version_and_is_replaced(tmp_path):
    publish(tmp_path, 1, domain="task")
    publish(tmp_path, 1)
    os.symlink("../task/versions/0001", tmp_path / "memory" / ".x")
    os.replace(tmp_path / "memory" / ".x", tmp_path / "memory" / "current")
    assert publisher.resolve(tmp_path, "memory") is None
    for bad in ("/etc", "versions/../../task/versions/0001", "versions/1", "versions/0009"):
        os.symlink(bad, tmp_path / "memory" / ".x")
        os.replace(tmp_path / "memory" / ".x", tmp_path / "memory" / "current")
        assert publisher.resolve(tmp_path, "memory") is None, bad
    assert publish(tmp_path, 2).number == 2
    assert os.readlink(tmp_path / "memory" / "current") == "versions/0002"


def test_version_folders_are_canonical_numbers_sorted_as_integers(tmp_path):
    versions = tmp_path / "memory" / "versions"
    for stray in ("9", "²", "0007.bak", "9999"):
        (versions / stray).mkdir(parents=True)
    (versions / "0005").write_text("a file, not a version")
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [9999]
    assert publish(tmp_path, 1, keep=2).number == 10000
    assert publish(tmp_path, 2, keep=2).number == 10001
    assert [v.number for v in publisher.versions(tmp_path, "memory")] == [10000, 10001]
    assert sorted(p.name for p in versions.iterdir()) == ["0005", "0007.bak", "10000", "10001", "9", "²"]


def test_pruning_never_deletes_the_current_or_the_newest_version_nor_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    (outside / "inside").mkdir(parents=True)
    root = tmp_path / "adapters_kd"
    for tag in (1, 2, 3):
        publish(root, tag)
    publisher.rollback(root, "memory", to=1)
    (root / "memory" / "versions" / "0002" / "planted").symlink_to(outside)
    publish(root, 4, keep=1)
    assert [v.number for v in publisher.versions(root, "memory")] == [4]
    publisher.rollback(root, "memory", to=4)  # still verifiable
    assert (outside / "inside").is_dir()


def test_a_manifest_from_another_domain_or_with_links_does_not_verify(tmp_path):
    v = publish(tmp_path, 1, domain="task")
    copy = tmp_path / "memory" / "versions" / "0001"
    shutil.copytree(v.path, copy)
    with pytest.raises(PublishError, match="names 'task' v1 but lies in 'memory'"):
        publisher.verify(copy)
    w = publish(tmp_path, 2)
    (w.path / "adapters.safetensors").unlink()
    (w.path / "adapters.safetensors").symlink_to(v.path / "adapters.safetensors")
    with pytest.raises(PublishError, match="does not match"):
        publisher.verify(w.path)


def test_a_failure_after_the_swap_says_the_version_is_current_and_the_summary_is_repaired(tmp_path, monkeypatch):
    publish(tmp_path, 1, domain="task")
    publish(tmp_path, 1)
    real = publisher.write_json_atomic

    def summary_fails(path: Path, obj) -> None:
        if path.name == publisher.SUMMARY:
            raise OSError(errno.EIO, "Input/output error")
        real(path, obj)

    monkeypatch.setattr(publisher, "write_json_atomic", summary_fails)
    with pytest.raises(PublishError, match=r"memory v2 is current \(published\); updating .*kd_summary.json failed"):
        publish(tmp_path, 2)
    monkeypatch.undo()
    assert publisher.resolve(tmp_path, "memory").number == 2
    assert publisher.read_summary(tmp_path)["domains"]["memory"]["version"] == 1  # stale until the next update
    publish(tmp_path, 2, domain="task")
    summary = publisher.read_summary(tmp_path)["domains"]
    assert (summary["memory"]["version"], summary["memory"]["tag"], summary["memory"]["history"]) == (2, 2, [1, 2])


def test_an_invalid_summary_is_rebuilt_from_every_domain(tmp_path):
    for domain in ("task", "debug", "memory"):
        publish(tmp_path, 3, domain=domain)
    (tmp_path / publisher.SUMMARY).write_text("[" * 100_000)
    publish(tmp_path, 4)
    summary = publisher.read_summary(tmp_path)["domains"]
    assert {d: e["version"] for d, e in summary.items()} == {"task": 1, "debug": 1, "memory": 2}
    assert summary["task"]["tag"] == 3


def test_a_planted_lock_link_is_refused_without_creating_its_target(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / ".lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PublishError, match="cannot lock"):
        publish(tmp_path, 1)
    assert not (tmp_path / "elsewhere").exists()


def test_publish_takes_a_reserved_number_and_leaves_a_gap(tmp_path):
    publish(tmp_path, 1)
    v = publisher.publish(tmp_path, "memory", writer(2), {}, first_number=7)
    assert v.number == 7 and [x.number for x in publisher.versions(tmp_path, "memory")] == [1, 7]
    assert publish(tmp_path, 3).number == 8  # the next free number, whatever was reserved before
    assert publisher.publish(tmp_path, "memory", writer(4), {}, first_number=2).number == 9  # never an old one


def _copier(source: Path, damage: str | None = None):
    """A `write_files(stage)` that copies a version's files, optionally damaging one."""

    def write(stage: Path) -> None:
        for rel, data in snapshot(source).items():
            if rel == publisher.MANIFEST:
                continue
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(data[:-1] if rel == damage else data)

    return write


def test_install_makes_a_version_from_elsewhere_current_with_its_number_and_bytes(tmp_path):
    src, dst = tmp_path / "b", tmp_path / "a"
    v = publisher.publish(src, "memory", writer(3, checkpoint=10), {"tag": 3}, first_number=4)
    manifest = (v.path / publisher.MANIFEST).read_bytes()
    got = publisher.install(dst, "memory", 4, _copier(v.path), manifest)
    assert got.number == 4 and publisher.resolve(dst, "memory").number == 4
    assert snapshot(got.path) == snapshot(v.path)
    entry = publisher.read_summary(dst)["domains"]["memory"]
    assert entry["version"] == 4 and entry["tag"] == 3 and entry["history"] == [4] and "installed_at" in entry
    assert (dst / "memory" / "checkpoint_10").is_symlink()  # the compat links, as publish makes them
    # a version older than the current one (a rollback elsewhere, this copy never held it) installs too
    low = publisher.install(dst, "memory", 2, _copier(v.path), manifest.replace(b'"version": 4', b'"version": 2'))
    assert low.number == 2 and publisher.resolve(dst, "memory").number == 2


@pytest.mark.parametrize("problem", ["damaged", "taken", "taken_empty", "other_version", "other_domain", "not_json"])
def test_install_refuses_and_keeps_the_previous_version(tmp_path, problem):
    src, dst = tmp_path / "b", tmp_path / "a"
    v = publisher.publish(src, "memory", writer(3), {}, first_number=2)
    publish(dst, 1)
    before = visible(dst)
    manifest = (v.path / publisher.MANIFEST).read_bytes()
    number, write = 2, _copier(v.path)
    if problem == "damaged":
        write = _copier(v.path, damage="adapters.safetensors")
    elif problem == "taken":
        number, manifest = 1, manifest.replace(b'"version": 2', b'"version": 1')
    elif problem == "taken_empty":  # an empty folder of that number: a rename would silently replace it
        (dst / "memory" / "versions" / "0002").mkdir()
        before = visible(dst)
    elif problem == "other_version":
        number = 3
    elif problem == "other_domain":
        manifest = manifest.replace(b'"domain": "memory"', b'"domain": "task"')
    else:
        manifest = b"{not json"
    with pytest.raises(PublishError):
        publisher.install(dst, "memory", number, write, manifest)
    assert publisher.resolve(dst, "memory").number == 1 and visible(dst) == before
    assert [x.number for x in publisher.versions(dst, "memory")] == [1] + ([2] if problem == "taken_empty" else [])
