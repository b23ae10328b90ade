"""Files written and read without following links and without half states: the small file-system
layer under jobs.publisher (the only writer of adapters_kd/) that kd-client's outbox, the worker's
data copies and the service files share. A path is opened with O_NOFOLLOW, a directory kept open
and its entries used through the descriptor (openat-style), writes go to a temp file that is
fsynced and renamed over the target."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from jobs import durable
from jobs.errors import PublishError, SecurityError

log = structlog.get_logger(__name__)

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_real_dir(path: Path | str, dir_fd: int | None = None) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_dir(path: Path, name: str | None = None, dir_fd: int | None = None) -> int:
    """A directory descriptor; a link there is refused (SecurityError), never followed."""
    target = name if name is not None else path
    try:
        return os.open(target, _DIR, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and os.path.islink(path)):
            raise SecurityError(
                f"{path} is a symbolic link to {os.readlink(path)}; it must be a real directory inside its "
                "domain (the publisher never follows a link it did not create): remove the link"
            ) from e
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) that every process on this machine respects."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:  # e.g. a file where the domain's directory must be, or a planted link
        raise PublishError(f"cannot lock {path}: {e}; {path.parent} must be a writable directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
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


def read_nofollow(path: Path) -> bytes:
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        return f.read()


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


def remove_at(name: str, dir_fd: int, path: Path) -> None:
    """Delete an entry of a directory we hold open: a link or file is unlinked, a real directory
    removed without following any link inside it."""
    try:
        if not stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
            os.unlink(name, dir_fd=dir_fd)
        elif shutil.rmtree.avoids_symlink_attacks:
            shutil.rmtree(name, dir_fd=dir_fd)
        else:  # no fd-based rmtree on this platform: path-based, after the lstat above
            shutil.rmtree(path)
    except OSError as e:
        log.warning("remove_failed", path=str(path), error=str(e))
