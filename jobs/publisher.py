"""adapters_kd/: the on-disk contract between the worker (writer) and the cortex (reader), and
the only code that writes there. No mlx, no Redis: the worker passes a `write(stage_dir)`
callback, kd-client uses `rollback`, the cortex uses `resolve` + `verify`.

Layout of one domain:
    adapters_kd/{domain}/versions/0001/   immutable: adapters.safetensors, adapter_config.json,
                                          kd_metrics.json, checkpoint_{N}/, manifest.json (sha256s)
    adapters_kd/{domain}/current          symlink -> versions/NNNN, swapped with one os.replace
    adapters_kd/{domain}/adapters.safetensors -> current/adapters.safetensors (and the other
                                          files, checkpoint_{N}): the seed's layout, so
                                          mlx_lm.load(..., adapter_path="adapters_kd/memory") works
    adapters_kd/kd_summary.json           one entry per domain, rewritten atomically under a lock

A version is staged in a hidden temp dir on the same filesystem, fsynced, renamed into
versions/, and only then made current. A reader that resolves `current` once (see `resolve`)
reads one consistent version; the compat links resolve per file, so a multi-file read through
them can straddle a swap; the cortex should use `resolve`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs import durable
from jobs.errors import PublishError, SecurityError
from jobs.models import check_domain

POINTER = "current"
MANIFEST = "manifest.json"
SUMMARY = "kd_summary.json"
WEIGHTS, ADAPTER_CONFIG, METRICS = "adapters.safetensors", "adapter_config.json", "kd_metrics.json"  # mlx-lm's names
COMPAT = (WEIGHTS, ADAPTER_CONFIG, METRICS, MANIFEST)


@dataclass(frozen=True)
class Version:
    domain: str
    number: int
    path: Path

    @property
    def name(self) -> str:
        return f"{self.number:04d}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def domain_dir(root: Path, domain: str) -> Path:
    """The domain's directory, refused if the name or a planted link would leave `root`."""
    try:
        check_domain(domain)
    except ValueError as e:
        raise SecurityError(str(e)) from e
    root = Path(root)
    d = root / domain
    if (d.exists() or d.is_symlink()) and not d.resolve().is_relative_to(root.resolve()):  # dangling links too
        raise SecurityError(f"{d} resolves outside {root}; refusing to write there")
    return d


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) that every process on this machine respects."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:  # e.g. a file where the domain's directory must be
        raise PublishError(f"cannot lock {path}: {e}; {path.parent} must be a writable directory") from e
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        durable.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, created with its final mode (it may hold a secret), fsync,
    os.replace: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
            f.flush()
            durable.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def verify(version_dir: Path) -> dict[str, Any]:
    """The manifest of a version after checking every file's size and sha256 (PublishError if not)."""
    try:
        manifest = json.loads((version_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise PublishError(f"{version_dir} has no readable {MANIFEST}: {e}") from e
    try:
        files = [(version_dir / rel, int(meta["size"]), str(meta["sha256"])) for rel, meta in manifest["files"].items()]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PublishError(f"{version_dir / MANIFEST} is malformed ({type(e).__name__}: {e}); republish it") from e
    for p, size, sha in files:
        if not p.is_file() or p.stat().st_size != size or sha256_file(p) != sha:
            raise PublishError(f"{p} does not match its manifest (partial or modified version)")
    return manifest


def resolve(root: Path, domain: str) -> Version | None:
    """The current version of a domain, resolved once (None if nothing is published)."""
    d = domain_dir(root, domain)
    try:
        target = os.readlink(d / POINTER)
        number = int(Path(target).name)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # not a symlink, not under a directory, or not versions/NNNN
        raise PublishError(f"{d / POINTER} is not a version pointer ({e}); repair or remove {d}") from e
    return Version(domain, number, (d / target).resolve())


def versions(root: Path, domain: str) -> list[Version]:
    d = domain_dir(root, domain) / "versions"
    if not d.is_dir():
        return []
    return [Version(domain, int(p.name), p) for p in sorted(d.iterdir()) if p.name.isdigit()]


def read_summary(root: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(root) / SUMMARY).read_text())
    except FileNotFoundError:
        return {"schema": 1, "domains": {}}
    except ValueError as e:
        raise PublishError(f"{Path(root) / SUMMARY} is not valid JSON: {e}") from e


def update_summary(root: Path, domain: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Read-modify-write of one domain's entry under the summary lock; atomic replace."""
    root = Path(root)
    with locked(root / f".{SUMMARY}.lock"):
        try:
            summary = read_summary(root)
        except PublishError:
            summary = {"schema": 1, "domains": {}}  # a corrupt summary is rebuilt entry by entry
        summary.setdefault("domains", {})
        summary["domains"][domain] = change(dict(summary["domains"].get(domain, {})))
        summary["updated_at"] = now_iso()
        write_json_atomic(root / SUMMARY, summary)
    return summary


def _swap_pointer(d: Path, version: Version) -> None:
    tmp = d / f".{POINTER}.{uuid.uuid4().hex}"
    os.symlink(f"versions/{version.name}", tmp)
    try:
        os.replace(tmp, d / POINTER)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(d)


def _points_to(d: Path, version: Version) -> bool:
    try:
        return os.readlink(d / POINTER) == f"versions/{version.name}"
    except OSError:
        return False


def _compat_links(d: Path, version: Version) -> None:
    """Stable links through `current` (created once), plus one per checkpoint of the version."""
    names = list(COMPAT) + sorted(p.name for p in version.path.glob("checkpoint_*"))
    for name in names:
        link = d / name
        if link.is_symlink() and os.readlink(link) == f"{POINTER}/{name}":
            continue
        tmp = d / f".{name}.{uuid.uuid4().hex}"
        os.symlink(f"{POINTER}/{name}", tmp)
        os.replace(tmp, link)
    for link in d.glob("checkpoint_*"):
        if link.is_symlink() and not link.exists():
            link.unlink()


def _prune(d: Path, root: Path, keep: int) -> None:
    current = resolve(root, d.name)
    old = versions(root, d.name)[:-keep]
    for v in old:
        if current is None or v.number != current.number:
            shutil.rmtree(v.path, ignore_errors=True)


def publish(root: Path, domain: str, write: Callable[[Path], None], summary: dict[str, Any], keep: int = 5) -> Version:
    """Stage -> fsync -> rename to an immutable version -> swap `current` -> links -> summary -> prune.
    Any failure before the swap leaves the previous version current and nothing a reader can see."""
    root = Path(root)
    d = domain_dir(root, domain)
    try:
        (d / "versions").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PublishError(
            f"publishing {domain} failed: cannot create {d / 'versions'}: {e}; {d} must be a writable directory"
        ) from e
    with locked(d / ".lock"):
        for stale in d.glob(".staging-*"):  # debris of a crashed publish (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        stage = d / f".staging-{uuid.uuid4().hex}"
        try:
            stage.mkdir()
            write(stage)
            existing = versions(root, domain)
            number = (existing[-1].number if existing else 0) + 1
            version = Version(domain, number, d / "versions" / f"{number:04d}")
            entry = {
                **summary,
                "version": number,
                "path": f"{domain}/versions/{version.name}",
                "published_at": now_iso(),
            }
            files = {
                str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in _files(stage)
            }
            write_json_atomic(stage / MANIFEST, {"domain": domain, "version": number, "files": files, "summary": entry})
            for p in _files(stage):
                with open(p, "rb") as f:
                    durable.fsync(f.fileno())
            _fsync_dir(stage)
            os.rename(stage, version.path)
            _fsync_dir(version.path.parent)
        except OSError as e:
            shutil.rmtree(stage, ignore_errors=True)
            hint = " (disk full)" if e.errno == errno.ENOSPC else ""
            raise PublishError(f"publishing {domain} failed{hint}: {e}; the previous version stays current") from e
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        try:
            _swap_pointer(d, version)
        except OSError as e:
            if _points_to(d, version):  # swapped, only the directory fsync failed
                raise PublishError(f"publishing {domain} v{number}: syncing the pointer failed: {e}") from e
            shutil.rmtree(version.path, ignore_errors=True)  # never current, so no reader has it
            raise PublishError(
                f"publishing {domain} failed at the pointer swap: {e}; the previous version stays current"
            ) from e
        try:
            _compat_links(d, version)
            update_summary(root, domain, lambda old: {**entry, "history": (old.get("history", []) + [number])[-20:]})
        except OSError as e:
            raise PublishError(f"publishing {domain} v{number} failed after staging: {e}") from e
        _prune(d, root, keep)
    return version


def record_rejection(root: Path, domain: str, info: dict[str, Any]) -> None:
    """A candidate the publish gate kept out: noted in the summary, nothing else changes."""
    update_summary(root, domain, lambda old: {**old, "last_rejected": {**info, "at": now_iso()}})


def rollback(root: Path, domain: str, to: int | None = None) -> Version:
    """Point `current` at an earlier (verified) version: `to`, or the one before the current."""
    root = Path(root)
    d = domain_dir(root, domain)
    with locked(d / ".lock"):
        current = resolve(root, domain)
        if current is None:
            raise PublishError(f"nothing is published for {domain!r}; nothing to roll back")
        available = {v.number: v for v in versions(root, domain)}
        if to is None:
            older = [n for n in available if n < current.number]
            if not older:
                raise PublishError(f"{domain} v{current.number} is the oldest kept version; nothing to roll back to")
            to = max(older)
        if to not in available:
            raise PublishError(f"{domain} has no version {to}; kept versions: {sorted(available)}")
        target = available[to]
        manifest = verify(target.path)
        _swap_pointer(d, target)
        _compat_links(d, target)
        entry = {**manifest["summary"], "rolled_back_from": current.number, "rolled_back_at": now_iso()}
        update_summary(root, domain, lambda old: {**entry, "history": old.get("history", [])})
    return target
