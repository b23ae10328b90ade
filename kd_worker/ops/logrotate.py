"""Size-capped rotation of the worker's own stdout/stderr files (launchd's StandardOut/ErrorPath).

launchd opens those files once, when it starts the worker, and the worker writes through the
inherited descriptors for weeks. newsyslog(8) rotates by renaming the file and then signalling a
process to reopen it; it has no copy-and-truncate mode. The worker would keep writing into the
renamed (or compressed, unlinked) archive, and its stderr is launchd's descriptor, which it cannot
reopen by path on a signal (SIGHUP's default action would also end it mid-job). So the worker rotates
its own files: when one passes MAX_BYTES it copies it to NAME.1 (older archives shift up to KEEP)
and truncates it in place, with O_APPEND set so the next line lands at the new start. Lines written
during the copy can be lost (a few at most), as with logrotate's copytruncate.

Only regular files are rotated: under systemd stderr is the journal's socket, on a terminal a TTY.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import sys
import threading
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MAX_BYTES = 16 * 1024 * 1024
KEEP = 3
CHECK_EVERY_S = 60.0
F_GETPATH = getattr(fcntl, "F_GETPATH", 50)  # <sys/fcntl.h>; Python defines it on darwin only
MAXPATHLEN = 1024


def fd_path(fd: int, platform: str = sys.platform) -> Path | None:
    """The path of the regular file `fd` writes to, or None (a pipe, socket, TTY, or unknown)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if platform == "darwin":
            raw = fcntl.fcntl(fd, F_GETPATH, bytes(MAXPATHLEN))
            return Path(os.fsdecode(raw.split(b"\0", 1)[0]))
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def archive(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_large(fd: int, path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> bool:
    """Copy-truncate `path` (written through `fd`) once it holds `max_bytes`; True if it did."""
    if os.fstat(fd).st_size < max_bytes:
        return False
    for n in range(keep - 1, 0, -1):
        if archive(path, n).exists():
            os.replace(archive(path, n), archive(path, n + 1))
    shutil.copyfile(path, archive(path, 1))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    os.ftruncate(fd, 0)
    return True


class LogRotator:
    """A thread that checks the worker's log files every `every_s` seconds."""

    def __init__(
        self,
        fds: tuple[int, ...] = (1, 2),
        max_bytes: int = MAX_BYTES,
        keep: int = KEEP,
        every_s: float = CHECK_EVERY_S,
        platform: str = sys.platform,
    ):
        self.targets = [(fd, path) for fd in fds if (path := fd_path(fd, platform)) is not None]
        self.max_bytes, self.keep, self.every_s = max_bytes, keep, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        for fd, path in self.targets:
            try:
                if rotate_if_large(fd, path, self.max_bytes, self.keep):
                    log.info("log_rotated", path=str(path), archive=str(archive(path, 1)))
            except OSError as e:
                log.warning("log_rotation_failed", path=str(path), error=str(e))

    def start(self) -> LogRotator:
        if self.targets:
            self._thread = threading.Thread(target=self._loop, name="kd-logrotate", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.check()
