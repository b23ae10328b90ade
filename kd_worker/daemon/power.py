"""Keep a Mac awake while a job runs, and only then.

macOS idle-sleeps during long CPU/GPU work unless something holds a power assertion; a sleeping Mac
stops training mid-job. While a job runs the worker keeps `/usr/bin/caffeinate -i -s -w PID` as a
child: `-i` prevents idle sleep, `-s` system sleep on AC power, and `-w PID` ends the assertion
when the worker exits, even if it is killed before it can stop the child (caffeinate(8)). Never
`-d`: keeping the display awake brings the display's own GPU watchdog into play and is not needed.

Off darwin this is a no-op (the platform switch `platform`); tests drive the darwin path on Linux
with a recorded fake of caffeinate (tests/fakes/caffeinate).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

CAFFEINATE = Path("/usr/bin/caffeinate")
FLAGS = ("-i", "-s")  # idle sleep, system sleep (on AC power); deliberately not -d (display)


class KeepAwake:
    """Context manager: a power assertion for the life of the block (one job)."""

    def __init__(self, pid: int | None = None, platform: str = sys.platform, executable: Path = CAFFEINATE):
        self.pid = os.getpid() if pid is None else pid
        self.platform = platform
        self.executable = executable
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [str(self.executable), *FLAGS, "-w", str(self.pid)]

    def __enter__(self) -> KeepAwake:
        if self.platform != "darwin":
            return self
        try:
            # close_fds=False lets CPython use posix_spawn on macOS: no fork() of a process running Metal.
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=False,
            )
        except OSError as e:  # the job still runs; the Mac may sleep during it
            log.warning("power_assertion_unavailable", argv=self.argv, error=str(e))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
