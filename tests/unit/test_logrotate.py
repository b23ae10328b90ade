"""kd_worker/ops/logrotate.py: the worker caps its own launchd log files by copy-and-truncate (newsyslog cannot
rotate a descriptor launchd holds open in the worker)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from types import SimpleNamespace

from helpers import wait_for

from kd_worker.ops import logrotate
from kd_worker.ops.logrotate import LogRotator, archive, fd_path, rotate_if_large


def test_a_full_file_is_archived_and_truncated_and_the_next_line_starts_it_again(tmp_path):
    log = tmp_path / "kd-worker.err.log"
    with open(log, "w") as f:  # opened without O_APPEND, as a supervisor might
        f.write("a" * 2000)
        f.flush()
        assert rotate_if_large(f.fileno(), log, max_bytes=1000, keep=3)
        assert archive(log, 1).read_text() == "a" * 2000 and log.stat().st_size == 0
        f.write("b\n")
        f.flush()
    assert log.read_text() == "b\n"  # at the start, not after 2000 bytes of holes


def test_small_files_are_left_alone(tmp_path):
    log = tmp_path / "w.log"
    with open(log, "w") as f:
        f.write("a" * 999)
        f.flush()
        assert not rotate_if_large(f.fileno(), log, max_bytes=1000, keep=3)
    assert log.read_text() == "a" * 999 and not archive(log, 1).exists()


def test_archives_shift_and_only_keep_are_kept(tmp_path):
    log = tmp_path / "w.log"
    with open(log, "a") as f:
        for n in range(1, 6):
            f.write(str(n) * 10)
            f.flush()
            assert rotate_if_large(f.fileno(), log, max_bytes=10, keep=3)
    assert [archive(log, n).read_text() for n in (1, 2, 3)] == ["5" * 10, "4" * 10, "3" * 10]
    assert not archive(log, 4).exists()


def test_only_regular_files_have_a_path_to_rotate(tmp_path):
    with open(tmp_path / "f.log", "w") as f:
        assert fd_path(f.fileno(), "linux") == tmp_path / "f.log"
    read, write = os.pipe()
    try:
        assert fd_path(write, "linux") is None and fd_path(write, "darwin") is None  # systemd's journal, a pipe
    finally:
        os.close(read), os.close(write)


def test_on_darwin_the_path_comes_from_f_getpath(tmp_path, monkeypatch):
    calls = []

    def recorded_fcntl(fd, cmd, arg=0):
        calls.append((fd, cmd, len(arg)))
        return b"/Users/me/Library/Logs/kd-daemon/kd-worker.err.log" + b"\0" * 900  # fcntl(2) F_GETPATH

    monkeypatch.setattr(logrotate, "fcntl", SimpleNamespace(fcntl=recorded_fcntl))
    with open(tmp_path / "f.log", "w") as f:
        path, fd = fd_path(f.fileno(), "darwin"), f.fileno()
    assert str(path) == "/Users/me/Library/Logs/kd-daemon/kd-worker.err.log"
    assert calls == [(fd, 50, 1024)]  # F_GETPATH with a MAXPATHLEN buffer


def test_the_rotator_thread_caps_a_growing_log(tmp_path):
    log = tmp_path / "w.log"
    with open(log, "w") as f:
        rotator = LogRotator(fds=(f.fileno(),), max_bytes=100, keep=2, every_s=0.05, platform="linux").start()
        try:
            f.write("x" * 150)
            f.flush()
            wait_for(lambda: archive(log, 1).exists() and log.stat().st_size == 0, timeout=10, what="a rotation")
            assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_APPEND
        finally:
            rotator.stop()
    assert archive(log, 1).read_text() == "x" * 150


def test_a_terminal_or_journal_worker_starts_no_thread():
    proc = subprocess.run(
        [sys.executable, "-c", "from kd_worker.ops.logrotate import LogRotator; print(LogRotator().targets)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "[]"  # stdout and stderr are pipes here
