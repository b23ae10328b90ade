"""The one way kd-daemon flushes a file to stable storage.

On macOS `fsync(2)` hands the data to the drive but does not make the drive write its cache, so a
power cut can still lose (or reorder) what was "synced"; `fcntl(fd, F_FULLFSYNC)` asks for that
flush (fsync(2) and fcntl(2) man pages on macOS). Elsewhere `os.fsync` is the flush. fcntl(2) says
F_FULLFSYNC is not supported by every file system (some network and FAT volumes): then plain fsync
is the best there is, as SQLite does it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", 51)  # <sys/fcntl.h>; Python defines it on darwin only


def fsync(fd: int) -> None:
    """Flush `fd` to stable storage: F_FULLFSYNC on darwin (fsync where it is refused), fsync elsewhere."""
    if sys.platform == "darwin":
        try:
            fcntl.fcntl(fd, F_FULLFSYNC)
            return
        except OSError:  # ENOTSUP/EINVAL on a file system without it: fall back, as fcntl(2) allows
            pass
    os.fsync(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories (entries), before `root` is renamed into place."""
    dirs = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            fsync(f.fileno())
    for d in reversed(dirs):
        fd = os.open(d, os.O_RDONLY)
        try:
            fsync(fd)
        finally:
            os.close(fd)
