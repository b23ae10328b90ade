"""Tell the cortex when a domain's published adapter changes: (domain, version, path), checked.

The worker publishes by renaming a complete version dir into `{domain}/versions/` and then
swapping the `{domain}/current` symlink with one `os.replace` (jobs/publisher.py). This watcher
watches the stable root (domains may appear later), reacts to the pointer's *name* only (inotify
reports a swap as `added`, polling as `modified`), resolves each pointer once, checks the
version's manifest checksums, and only then reports it. A burst of publishes arrives as one
watchfiles batch, and a consumer that falls behind only ever sees the newest version.

The thread only signals: no MLX here (cortex swaps weights on its own thread, kd_client/hotswap.py).

With a `mirror` (kd_client/mirror.py; KD_ADAPTERS_SOURCE=redis for `kd-client serve` and `follow`)
the thread mirrors the versions published in Redis into `root` instead of watching the file system,
and reports what each pass made current: the same updates, for a machine that runs no worker.

    with AdapterWatcher("adapters_kd", domains=["memory"]) as w:
        for update in w.updates():          # on the caller's thread
            slot.apply(update.path)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from watchfiles import Change, watch

from jobs import publisher
from jobs.errors import KDError, PublishError, SecurityError
from jobs.models import check_domain

if TYPE_CHECKING:
    from kd_client.mirror import Mirror

log = structlog.get_logger(__name__)

OnChange = Callable[["AdapterUpdate"], None]


class WatcherFailed(KDError):
    """The watcher thread stopped on an error; the cortex keeps its current adapters."""


@dataclass(frozen=True)
class AdapterUpdate:
    domain: str
    version: int
    path: Path  # the resolved, immutable version dir: pass it to mlx_lm.load / AdapterSlot.apply
    manifest: dict[str, Any] = field(repr=False, compare=False)


def _is_domain(name: str) -> bool:
    try:
        check_domain(name)
    except ValueError:
        return False
    return True


class AdapterWatcher:
    """Watch `root` (adapters_kd/) in a thread; report each new current version once, verified.

    `on_change` runs on the watcher thread: keep it short (set a flag, queue a task). Consumers
    on their own thread use `take()` / `updates()`, which hold only the newest update per domain.
    A rollback that points `current` back to an older version is a change and is reported.
    """

    def __init__(
        self,
        root: Path | str,
        domains: Iterable[str] | None = None,
        *,
        on_change: OnChange | None = None,
        force_polling: bool | None = None,
        report_existing: bool = True,
        debounce_ms: int = 1600,
        step_ms: int = 50,
        rescan_s: float | None = None,
        poll_delay_ms: int = 300,
        verify_attempts: int = 3,
        mirror: Mirror | None = None,
    ):
        self.root = Path(root).absolute()
        if mirror is not None and mirror.root != self.root:
            raise ValueError(f"the mirror writes into {mirror.root}, not into the watched {self.root}")
        self.mirror = mirror
        self._roots = {self.root, self.root.resolve()}  # events may carry either (macOS: /private/var)
        self.domains = None if domains is None else tuple(publisher.domain_dir(self.root, d).name for d in domains)
        self.on_change = on_change
        self.force_polling, self.report_existing = force_polling, report_existing
        self.debounce_ms, self.step_ms, self.poll_delay_ms = debounce_ms, step_ms, poll_delay_ms
        # Resolving the pointers is a readlink per domain: the safety net for a missed event. A
        # poll watcher can miss a swap (coarse mtimes), so polling also rescans every poll.
        if rescan_s is None:
            rescan_s = poll_delay_ms / 1000 if force_polling else 2.0
        self.rescan_ms = max(int(rescan_s * 1000), step_ms)
        self.verify_attempts = max(verify_attempts, 1)
        self.reported: dict[str, int] = {}  # domain -> last version reported
        self.invalid: dict[str, int] = {}  # domain -> current version that failed verification
        self.error: Exception | None = None
        self._pending: dict[str, AdapterUpdate] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()  # the thread has ended (is_alive() lags behind its last notify)
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0
        self._problems: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> AdapterWatcher:
        if self._thread is not None:
            raise WatcherFailed("this AdapterWatcher was already started; create a new one")
        self._thread = threading.Thread(target=self._run, name="kd-adapter-watcher", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once file events are being received (reports made before then come from scans)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop and join the thread; True if it ended within `timeout`."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> AdapterWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- consumer side -------------------------------------------------------------------------
    def take(self, timeout: float | None = None) -> list[AdapterUpdate]:
        """The pending updates (newest per domain), waiting up to `timeout`; [] on timeout or stop."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._pending or self._stop.is_set() or self._done.is_set() or self._thread is None, timeout
            )
            out, self._pending = list(self._pending.values()), {}
        if not out and self.error is not None:
            raise WatcherFailed(f"the adapter watcher of {self.root} stopped: {self.error}") from self.error
        return out

    def updates(self, wait_s: float = 0.5) -> Iterator[AdapterUpdate]:
        """Updates as they come, on the caller's thread, until `stop()` (WatcherFailed if the thread died)."""
        while not self._stop.is_set() and not self._done.is_set():
            yield from self.take(wait_s)

    # -- watcher thread ------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("watcher_started", root=str(self.root), domains=self.domains, force_polling=self.force_polling)
        try:
            self._watch()
        except Exception as e:  # noqa: BLE001 - the thread hands any failure to the consumer
            self.error = e
            log.error("watcher_failed", root=str(self.root), error=f"{type(e).__name__}: {e}")
        finally:
            self._ready.set()
            self._done.set()
            with self._cond:
                self._cond.notify_all()
            log.info("watcher_stopped", root=str(self.root))

    def _watch(self) -> None:
        if self.mirror is not None:
            self._scan(report=self.report_existing)  # what the directory held before the first pass
            self.mirror.follow(self._stop, self._mirrored)
            return
        while not self.root.is_dir():  # the root appears with the first publish
            if self._stop.wait(self.rescan_ms / 1000):
                return
        self._scan(report=self.report_existing)
        for _ in watch(
            self.root,
            watch_filter=self._relevant,
            debounce=self.debounce_ms,
            step=self.step_ms,
            stop_event=self._stop,
            rust_timeout=self.rescan_ms,
            yield_on_timeout=True,
            force_polling=self.force_polling,
            poll_delay_ms=self.poll_delay_ms,
            raise_interrupt=False,
        ):
            self._scan(report=True)  # a batch of events or a quiet period: resolve every pointer once
            self._ready.set()

    def _mirrored(self, results: object) -> None:
        """After each pass of the mirror: report what is current now (checked as always)."""
        self._scan(report=True)
        self._ready.set()

    def _relevant(self, change: Change, path: str) -> bool:
        """A domain's pointer or the domain dir itself (polling may only see the dir's mtime
        change on a swap); never a file inside a version. Any event counts once a rescan is
        due, so a stream of unrelated events cannot starve the periodic rescan."""
        if time.monotonic() >= self._next_scan:
            return True
        p = Path(path)
        if p.name == publisher.POINTER:
            p = p.parent
        return p.parent in self._roots and _is_domain(p.name) and self._wanted(p.name)

    def _wanted(self, domain: str) -> bool:
        return self.domains is None or domain in self.domains

    def _scan(self, report: bool) -> None:
        self._next_scan = time.monotonic() + self.rescan_ms / 1000
        for domain in self._domains():
            if self._stop.is_set():
                return
            update = self._check(domain)
            if update is not None:
                self.reported[domain] = update.version
                if report:
                    self._emit(update)

    def _domains(self) -> list[str]:
        if self.domains is not None:
            return list(self.domains)
        try:
            return sorted(p.name for p in self.root.iterdir() if _is_domain(p.name) and p.is_dir())
        except FileNotFoundError:
            return []

    def _check(self, domain: str) -> AdapterUpdate | None:
        """The domain's current version if it is new and its manifest verifies, else None."""
        try:
            version = publisher.resolve(self.root, domain)
        except (SecurityError, ValueError, OSError) as e:
            if self._problems.get(domain) != str(e):  # once per problem, not once per rescan
                log.warning("adapter_pointer_unreadable", domain=domain, error=str(e))
            self._problems[domain] = str(e)
            return None
        self._problems.pop(domain, None)
        if version is None:
            self.reported.pop(domain, None)
            return None
        if self.reported.get(domain) == version.number or self.invalid.get(domain) == version.number:
            return None
        manifest = self._verify(version)
        if manifest is None:
            self.invalid[domain] = version.number
            return None
        self.invalid.pop(domain, None)
        return AdapterUpdate(domain, version.number, version.path, manifest)

    def _verify(self, version: publisher.Version) -> dict[str, Any] | None:
        # Retries cover a network filesystem that shows a rename before the data; a local
        # publish is complete before the pointer moves, so the first check normally passes.
        for attempt in range(self.verify_attempts):
            try:
                manifest = publisher.verify(version.path)
                if manifest.get("domain") == version.domain and manifest.get("version") == version.number:
                    return manifest
                error: Exception = PublishError(f"{version.path}: the manifest names another version")
            except (PublishError, OSError) as e:
                error = e
            if attempt + 1 < self.verify_attempts and self._stop.wait(0.1 * 2**attempt):
                return None
        log.warning(
            "adapter_invalid", domain=version.domain, version=version.number, path=str(version.path), error=str(error)
        )
        return None

    def _emit(self, update: AdapterUpdate) -> None:
        log.info("adapter_changed", domain=update.domain, version=update.version, path=str(update.path))
        with self._cond:
            self._pending[update.domain] = update
            self._cond.notify_all()
        if self.on_change is not None:
            try:
                self.on_change(update)
            except Exception as e:  # noqa: BLE001 - a consumer's bug must not end the watching
                log.error(
                    "watcher_callback_failed",
                    domain=update.domain,
                    version=update.version,
                    error=f"{type(e).__name__}: {e}",
                )
