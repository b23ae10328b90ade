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

Planted state (someone with write access to adapters_kd/): the publisher never follows a link it
did not create. The domain dir, versions/ and every version dir must be real directories (opened
with O_NOFOLLOW, then used through their descriptors); `current` counts only as `versions/NNNN` of
its own domain; version folders are canonical numbers (0001, 10000), anything else there is
ignored; a manifest names its domain and version; pruning deletes only real version dirs of its
own domain, never the current or the newest one, and never through a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from jobs import durable, jsonsafe
from jobs.errors import PublishError, SecurityError
from jobs.models import check_domain
from jobs.safefs import (  # noqa: F401 (locked, write_bytes_atomic, sha256_file: used through this module too)
    is_real_dir,
    locked,
    open_dir,
    read_nofollow,
    remove_at,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)

log = structlog.get_logger(__name__)

POINTER = "current"
VERSIONS = "versions"
MANIFEST = "manifest.json"
SUMMARY = "kd_summary.json"
WEIGHTS, ADAPTER_CONFIG, METRICS = "adapters.safetensors", "adapter_config.json", "kd_metrics.json"  # mlx-lm's names
COMPAT = (WEIGHTS, ADAPTER_CONFIG, METRICS, MANIFEST)

_VERSION_NAME = re.compile(r"[0-9]{4,}")  # ASCII digits only ("²".isdigit() is True)


@dataclass(frozen=True)
class Version:
    domain: str
    number: int
    path: Path

    @property
    def name(self) -> str:
        return version_name(self.number)


def version_name(number: int) -> str:
    return f"{number:04d}"


def version_number(name: str) -> int | None:
    """The number of a canonical version folder name (0001, 10000); None for anything else (9, 0007.bak, ²)."""
    if not _VERSION_NAME.fullmatch(name):
        return None
    number = int(name)
    return number if number >= 1 and version_name(number) == name else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def domain_dir(root: Path, domain: str) -> Path:
    """The domain's directory, refused if the name would leave `root` or a link was planted there."""
    try:
        check_domain(domain)
    except ValueError as e:
        raise SecurityError(str(e)) from e
    root = Path(root)
    d = root / domain
    if d.is_symlink():  # dangling links too
        where = "" if d.resolve().is_relative_to(root.resolve()) else f", which resolves outside {root}"
        raise SecurityError(
            f"{d} is a symbolic link to {os.readlink(d)}{where}; the publisher never follows a link it did "
            "not create: remove the link"
        )
    return d


@contextlib.contextmanager
def _opened(d: Path, create: bool) -> Iterator[tuple[int, int]]:
    """Descriptors of the domain dir and its versions/ (created if asked), both real directories."""
    with contextlib.ExitStack() as stack:
        if create:
            d.mkdir(parents=True, exist_ok=True)
        dfd = open_dir(d)
        stack.callback(os.close, dfd)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(VERSIONS, dir_fd=dfd)
        vfd = open_dir(d / VERSIONS, VERSIONS, dfd)
        stack.callback(os.close, vfd)
        yield dfd, vfd


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """The manifest of a version, checked to name the domain and version it lies in (not the files)."""
    path = Path(version_dir) / MANIFEST
    try:
        manifest = jsonsafe.loads(read_nofollow(path))
    except (OSError, ValueError) as e:
        raise PublishError(f"{version_dir} has no readable {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict):
        raise PublishError(f"{path} is malformed (not a JSON object); republish it")
    real = Path(version_dir).resolve()
    if real.parent.name == VERSIONS:  # a published version: it must be the one its manifest names
        where = (real.parent.parent.name, version_number(real.name))
        if "domain" not in manifest or "version" not in manifest:
            raise PublishError(f"{path} is malformed (it names no domain and version); republish it")
        if (manifest["domain"], manifest["version"]) != where:
            raise PublishError(
                f"{path} names {manifest.get('domain')!r} v{manifest.get('version')} but lies in "
                f"{where[0]!r} as v{where[1]}: a version moved or copied from elsewhere; remove it"
            )
    return manifest


def _manifest_file(version_dir: Path, rel: str) -> Path:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise PublishError(f"{version_dir / MANIFEST} names {rel!r}, which is not a path inside the version")
    return Path(version_dir, *parts)


def verify(version_dir: Path) -> dict[str, Any]:
    """The manifest of a version after checking every file's size and sha256 (PublishError if not).
    Files are regular files inside the version (a link there does not match)."""
    manifest = read_manifest(version_dir)
    check_files(version_dir, manifest)
    return manifest


def check_files(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is a regular file inside `version_dir` with its size and sha256."""
    try:
        files = [(rel, int(meta["size"]), str(meta["sha256"])) for rel, meta in manifest["files"].items()]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PublishError(f"{version_dir / MANIFEST} is malformed ({type(e).__name__}: {e}); republish it") from e
    real = Path(version_dir).resolve()
    for rel, size, sha in files:
        p = _manifest_file(version_dir, rel)
        try:
            st = os.lstat(p)
            inside = p.resolve().is_relative_to(real)
            ok = inside and stat.S_ISREG(st.st_mode) and st.st_size == size and sha256_file(p) == sha
        except OSError:
            ok = False
        if not ok:
            raise PublishError(f"{p} does not match its manifest (partial or modified version)")


def _pointer_target(d: Path, dir_fd: int | None = None) -> str | None:
    try:
        return os.readlink(POINTER if dir_fd is not None else d / POINTER, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:  # not a link, or the domain is not a directory
        return ""


def resolve(root: Path, domain: str) -> Version | None:
    """The current version of a domain, resolved once (None if nothing is published). `current`
    counts only as the link `versions/NNNN` to a real version dir of the domain's own versions/;
    anything else (a link into another domain, a file, a link out) is not a published version."""
    d = domain_dir(root, domain)
    target = _pointer_target(d)
    name = target.removeprefix(f"{VERSIONS}/") if target and target.startswith(f"{VERSIONS}/") else ""
    number = version_number(name)
    if number is None or not is_real_dir(d / VERSIONS) or not is_real_dir(d / VERSIONS / name):
        return None
    return Version(domain, number, (d / VERSIONS / name).resolve())


def _listing(d: Path, vfd: int) -> tuple[list[Version], int]:
    """Real version dirs (numerically sorted) and the highest number any entry's name takes."""
    found, highest = [], 0
    for name in os.listdir(vfd):
        number = version_number(name)
        if number is None:
            log.warning("version_folder_ignored", path=str(d / VERSIONS / name), reason="not a version number")
            continue
        highest = max(highest, number)
        if is_real_dir(name, vfd):
            found.append(Version(d.name, number, d / VERSIONS / name))
        else:
            log.warning("version_folder_ignored", path=str(d / VERSIONS / name), reason="not a real directory")
    return sorted(found, key=lambda v: v.number), highest


def versions(root: Path, domain: str) -> list[Version]:
    """The domain's versions, oldest first (SecurityError if versions/ is a planted link)."""
    d = domain_dir(root, domain)
    if not os.path.lexists(d / VERSIONS):
        return []
    with _opened(d, create=False) as (_, vfd):
        return _listing(d, vfd)[0]


def read_summary(root: Path) -> dict[str, Any]:
    path = Path(root) / SUMMARY
    try:
        summary = jsonsafe.loads(read_nofollow(path))
    except FileNotFoundError:
        return {"schema": 1, "domains": {}}
    except (OSError, ValueError) as e:
        raise PublishError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(summary, dict) or not isinstance(summary.get("domains"), dict):
        raise PublishError(f"{path} is not a summary (no 'domains' object)")
    return summary


def _domains_on_disk(root: Path) -> list[str]:
    try:
        names = os.listdir(root)
    except OSError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(ValueError):
            out.append(check_domain(name))
    return out


def _reconcile(root: Path, summary: dict[str, Any], updating: str) -> None:
    """Entries that do not name their domain's current version are rebuilt from its manifest
    (the entry being updated is expected to lag: its publish or rollback just moved `current`)."""
    domains = summary["domains"]
    for domain in sorted(set(_domains_on_disk(root)) | {k for k in domains if isinstance(k, str)}):
        try:
            current = resolve(root, domain)
            old = domains.get(domain)
            if current is None or (isinstance(old, dict) and old.get("version") == current.number):
                continue
            entry = read_manifest(current.path).get("summary")
        except (SecurityError, PublishError) as e:
            log.warning("summary_entry_not_repaired", domain=domain, error=str(e))
            continue
        if not isinstance(entry, dict):
            continue
        history = old.get("history", []) if isinstance(old, dict) and isinstance(old.get("history"), list) else []
        domains[domain] = {**entry, "history": ([h for h in history if h != current.number] + [current.number])[-20:]}
        if domain != updating:
            log.warning("summary_entry_repaired", domain=domain, version=current.number)


def update_summary(root: Path, domain: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Read-modify-write of one domain's entry under the summary lock; atomic replace. Entries
    that do not name their domain's current version (a failure after a swap, an invalid file)
    are repaired from the pointers first, for every domain."""
    root = Path(root)
    with locked(root / f".{SUMMARY}.lock"):
        try:
            summary = read_summary(root)
        except PublishError as e:
            log.warning("summary_rebuilt", error=str(e))
            summary = {"schema": 1, "domains": {}}
        _reconcile(root, summary, domain)
        old = summary["domains"].get(domain)
        summary["domains"][domain] = change(dict(old) if isinstance(old, dict) else {})
        summary["updated_at"] = now_iso()
        write_json_atomic(root / SUMMARY, summary)
    return summary


def _replace_link(dfd: int, name: str, target: str) -> None:
    """Point the link `name` in the domain dir at `target` in one rename (a reader sees old or new)."""
    tmp = f".{name}.{uuid.uuid4().hex}"
    os.symlink(target, tmp, dir_fd=dfd)
    try:
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _swap_pointer(dfd: int, version: Version) -> None:
    _replace_link(dfd, POINTER, f"{VERSIONS}/{version.name}")
    durable.fsync(dfd)


def _compat_links(dfd: int, version: Version) -> None:
    """Stable links through `current` (created once), plus one per checkpoint of the version."""
    names = list(COMPAT) + sorted(p.name for p in version.path.glob("checkpoint_*"))
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(name, dir_fd=dfd) == f"{POINTER}/{name}":
                continue
        _replace_link(dfd, name, f"{POINTER}/{name}")
    for name in os.listdir(dfd):
        if name.startswith("checkpoint_") and stat.S_ISLNK(os.lstat(name, dir_fd=dfd).st_mode):
            try:
                os.stat(name, dir_fd=dfd)
            except FileNotFoundError:
                os.unlink(name, dir_fd=dfd)


def _prune(d: Path, vfd: int, keep: int) -> None:
    """Old real version dirs of this domain go; never the current one, never the newest."""
    current = resolve(d.parent, d.name)
    kept, _ = _listing(d, vfd)
    for v in kept[: -max(keep, 1)]:
        if current is None or v.number != current.number:
            remove_at(v.name, vfd, v.path)


def _stage(stage: Path, write: Callable[[Path], None], summary: dict[str, Any], number: int) -> None:
    """Write a version and its manifest in a hidden dir of the domain."""
    d = stage.parent
    write(stage)
    files = {str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in _files(stage)}
    write_json_atomic(stage / MANIFEST, {"domain": d.name, "version": number, "files": files, "summary": summary})


def publish(
    root: Path,
    domain: str,
    write: Callable[[Path], None],
    summary: dict[str, Any],
    keep: int = 5,
    first_number: int = 1,
) -> Version:
    """Stage -> fsync -> rename to an immutable version -> swap `current` -> links -> summary -> prune.
    Any failure before the swap leaves the previous version current and nothing a reader can see;
    a failure after it says that the new version is current (the summary is repaired later).
    The version's number is the next free one, at least `first_number` (a number reserved in Redis)."""

    def place(d: Path, dfd: int, vfd: int) -> tuple[Version, dict[str, Any]]:
        number = max(_listing(d, vfd)[1] + 1, first_number)
        version = Version(domain, number, d / VERSIONS / version_name(number))
        entry = {**summary, "version": number, "path": f"{domain}/{VERSIONS}/{version.name}", "published_at": now_iso()}
        _place(d, dfd, vfd, version, lambda stage: _stage(stage, write, entry, number), "publishing")
        return version, entry

    return _locked_publish(Path(root), domain, keep, place)


def install(
    root: Path, domain: str, number: int, write_files: Callable[[Path], None], manifest: bytes, keep: int = 5
) -> Version:
    """Make a version published elsewhere (`kd-client sync`) current here, as `publish` would: its
    number and its manifest bytes unchanged. `write_files(stage)` writes the manifest's files; each
    is checked against the manifest before the version is renamed into place, so a partial or
    corrupt transfer leaves the previous version current (PublishError)."""
    try:
        doc = jsonsafe.loads(manifest)
    except ValueError as e:
        raise PublishError(f"installing {domain} v{number}: the manifest is not JSON ({e})") from e
    if not isinstance(doc, dict) or (doc.get("domain"), doc.get("version")) != (domain, number):
        raise PublishError(f"installing {domain} v{number}: the manifest names another domain or version")

    def fill(stage: Path) -> None:
        write_files(stage)
        with os.fdopen(
            os.open(stage / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb"
        ) as f:
            f.write(manifest)
        check_files(stage, doc)

    def place(d: Path, dfd: int, vfd: int) -> tuple[Version, dict[str, Any]]:
        version = Version(domain, number, d / VERSIONS / version_name(number))
        if _exists_at(version.name, vfd):
            raise PublishError(
                f"installing {domain} v{number}: {version.path} already exists (another version {number}); "
                "remove it, or sync into a directory of its own"
            )
        _place(d, dfd, vfd, version, fill, "installing")
        summary = doc.get("summary")
        return version, {**(summary if isinstance(summary, dict) else {}), "installed_at": now_iso()}

    return _locked_publish(Path(root), domain, keep, place)


def _exists_at(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


Place = Callable[[Path, int, int], tuple[Version, dict[str, Any]]]


def _locked_publish(root: Path, domain: str, keep: int, place: Place) -> Version:
    """Under the domain's lock: clear debris, `place` a version (stage, rename, swap), then the
    links, the summary and pruning."""
    d = domain_dir(root, domain)
    with contextlib.ExitStack() as stack:
        try:
            dfd, vfd = stack.enter_context(_opened(d, create=True))
        except OSError as e:
            raise PublishError(
                f"publishing {domain} failed: cannot create {d / VERSIONS}: {e}; {d} must be a writable directory"
            ) from e
        stack.enter_context(locked(d / ".lock"))
        # debris of a crashed publish (we hold the lock)
        for stale in [n for n in os.listdir(dfd) if n.startswith(".staging-")]:
            remove_at(stale, dfd, d / stale)
        version, entry = place(d, dfd, vfd)
        problems = _after_swap(root, d, dfd, version, entry)
        _prune(d, vfd, keep)
        if problems:
            raise PublishError(
                f"{domain} v{version.number} is current (published); {'; '.join(problems)}; kd_summary.json is "
                "repaired from the pointers at the next publish"
            )
    return version


def _place(d: Path, dfd: int, vfd: int, version: Version, fill: Callable[[Path], None], verb: str) -> None:
    """Stage (`fill` a hidden dir, fsync it), rename into versions/, swap the pointer."""
    domain, stage = d.name, None
    try:
        previous = _pointer_target(d, dfd)
        stage = f".staging-{uuid.uuid4().hex}"
        os.mkdir(stage, dir_fd=dfd)
        fill(d / stage)
        durable.fsync_tree(d / stage)
        os.rename(stage, version.name, src_dir_fd=dfd, dst_dir_fd=vfd)
        stage = None
        durable.fsync(vfd)
    except OSError as e:
        if stage is not None:
            remove_at(stage, dfd, d / stage)
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise PublishError(f"{verb} {domain} failed{hint}: {e}; the previous version stays current") from e
    except BaseException:
        if stage is not None:
            remove_at(stage, dfd, d / stage)
        raise
    if previous is not None and resolve(d.parent, domain) is None:
        log.warning("invalid_pointer_replaced", pointer=str(d / POINTER), target=previous)
    try:
        _swap_pointer(dfd, version)
    except OSError as e:
        if _pointer_target(d, dfd) == f"{VERSIONS}/{version.name}":  # swapped, only the directory fsync failed
            raise PublishError(f"{domain} v{version.number} is current; syncing the pointer failed: {e}") from e
        remove_at(version.name, vfd, version.path)  # never current, so no reader has it
        raise PublishError(
            f"{verb} {domain} failed at the pointer swap: {e}; the previous version stays current"
        ) from e


def _after_swap(root: Path, d: Path, dfd: int, version: Version, entry: dict[str, Any]) -> list[str]:
    """Links and summary after the swap; both are tried, and what failed is reported."""
    problems = []
    try:
        _compat_links(dfd, version)
    except OSError as e:
        problems.append(f"updating the compatibility links in {d} failed: {e}")
    n = version.number
    try:
        update_summary(root, d.name, lambda old: {**entry, "history": _history(old, n)})
    except (OSError, PublishError) as e:
        problems.append(f"updating {root / SUMMARY} failed: {e}")
    return problems


def _history(old: dict[str, Any], number: int) -> list[int]:
    history = old.get("history", []) if isinstance(old.get("history"), list) else []
    return ([h for h in history if h != number] + [number])[-20:]


def record_rejection(root: Path, domain: str, info: dict[str, Any]) -> None:
    """A candidate the publish gate kept out: noted in the summary, nothing else changes."""
    update_summary(root, domain, lambda old: {**old, "last_rejected": {**info, "at": now_iso()}})


def rollback(root: Path, domain: str, to: int | None = None) -> Version:
    """Point `current` at an earlier (verified) version: `to`, or the one before the current.
    With `to`, it also repairs a domain whose `current` is missing or invalid."""
    root = Path(root)
    d = domain_dir(root, domain)
    if not os.path.lexists(d / VERSIONS):
        raise PublishError(f"nothing is published for {domain!r}; nothing to roll back")
    with _opened(d, create=False) as (dfd, vfd), locked(d / ".lock"):
        current = resolve(root, domain)
        available = {v.number: v for v in _listing(d, vfd)[0]}
        if to is None:
            if current is None:
                raise PublishError(
                    f"nothing valid is published for {domain!r}; nothing to roll back (name a version with --to)"
                )
            older = [n for n in available if n < current.number]
            if not older:
                raise PublishError(f"{domain} v{current.number} is the oldest kept version; nothing to roll back to")
            to = max(older)
        if to not in available:
            raise PublishError(f"{domain} has no version {to}; kept versions: {sorted(available)}")
        target = available[to]
        manifest = verify(target.path)
        _swap_pointer(dfd, target)
        _compat_links(dfd, target)
        entry = {**manifest["summary"], "rolled_back_from": current.number if current else None}
        entry["rolled_back_at"] = now_iso()
        update_summary(root, domain, lambda old: {**entry, "history": old.get("history", [])})
    return target
