"""KD_PUBLISH_TO=redis|both: a published version also goes to Redis, for consumers on other machines.

Everything here runs inside the domain's publish order (kd_worker/daemon/ordering.py: tickets +
the publish lock), so Redis pointers follow the same order as the versions themselves:

    prepare  mirror the domain's current version from Redis into this worker's publish dir (another
             worker's version, or a rollback): the gate compares with what consumers serve
    reserve  the version number, from Redis: unique and increasing across every worker
    push     after the local publish, the version's blobs, record and pointer (kd_client/mirror.py)
"""

from __future__ import annotations

import structlog
from redis import Redis

from jobs import publisher
from jobs.errors import KDError, PublishError
from kd_client import mirror
from kd_worker.settings import WorkerSettings

log = structlog.get_logger(__name__)


class RedisPublishing:
    """The Redis side of publishing one worker's versions (see the module docstring)."""

    def __init__(self, conn: Redis, settings: WorkerSettings):
        self.conn, self.root = conn, settings.publish_root
        self.keep, self.max_bytes = settings.keep_versions, settings.max_adapter_bytes

    def prepare(self, domain: str) -> None:
        """Bring the domain's current version from Redis; if that fails the gate compares with this
        worker's own current version (the numbering stays right: it comes from Redis)."""
        try:
            result = mirror.sync_domain(self.conn, self.root, domain, self.keep, self.max_bytes)
        except (KDError, OSError) as e:
            log.warning("redis_current_not_mirrored", domain=domain, error=f"{type(e).__name__}: {e}")
            return
        if result.action in ("installed", "pointed"):
            log.info("redis_current_mirrored", domain=domain, version=result.version, action=result.action)

    def reserve(self, domain: str) -> int:
        """The number the next local publish takes (at least; the publisher adds any local gap)."""
        local = publisher.versions(self.root, domain)
        return mirror.reserve_number(self.conn, domain, (local[-1].number if local else 0) + 1)

    def push(self, version: publisher.Version) -> None:
        try:
            mirror.push(self.conn, version, self.keep, self.max_bytes)
        except KDError as e:
            raise PublishError(
                f"{version.domain} v{version.number} is current in {self.root} but not in Redis: {e}; consumers on "
                "other machines keep the previous version until the domain's next publish"
            ) from e
