"""Published adapter versions in Redis: the one owner of their layout, for the worker that pushes
a version (KD_PUBLISH_TO=redis|both) and the consumers that mirror it (`kd-client sync`, the
watcher with a Mirror). Key names are in jobs/models.py.

    kd:pub:blob:{sha256}         a chunk of a file (at most 4 MiB) or a version's manifest.json
    kd:pub:refs                  hash sha256 -> number of retained versions that reference the blob
    kd:pub:versions:{domain}     hash version -> {"manifest_sha256", "files": {path: [chunk sha256]}, "blobs", "bytes"}
    kd:pub:current:{domain}      {"version", "manifest_sha256"}: moved by one Lua script, with the index
    kd:pub:seq:{domain}          the highest version number reserved (one numbering for every worker)
    kd:pub:domains, kd:pub:changed   the domains with a pointer; the channel a pointer move is PUBLISHed on

A push uploads the chunks Redis lacks (with a TTL: a push that dies leaves nothing behind for
long), then one script checks that every blob is there, records the version, counts its blobs,
moves the pointer, prunes the domain to its newest `keep` versions (never the current one;
blobs that no retained version references are deleted) and publishes the domain's name.

A consumer installs exactly the pointer's version through `jobs.publisher.install`: the manifest
must hash to the pointer's digest, every chunk to its own digest and length, every file to the
manifest's; sizes are checked in Redis before anything is read. A rollback there is the pointer
moving back; a version the consumer already holds is pointed to, not downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis, RedisError
from redis.client import PubSub
from redis.exceptions import OutOfMemoryError, ResponseError

from jobs import jsonsafe, publisher
from jobs.errors import KDError, PublishError, SecurityError, StateError, TransferError
from jobs.models import (
    PUB_CHANNEL,
    PUB_DOMAINS_KEY,
    PUB_REFS_KEY,
    Sha256,
    check_domain,
    check_key_types,
    pub_blob_key,
    pub_current_key,
    pub_key_types,
    pub_seq_key,
    pub_versions_key,
)
from jobs.safefs import open_dir, read_nofollow
from kd_client.settings import ClientSettings

log = structlog.get_logger(__name__)

CHUNK_BYTES = 4 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_RECORD_BYTES = 4 << 20
MAX_POINTER_BYTES = 512
PENDING_TTL_S = 3600  # an uploaded blob no committed version references yet expires after this
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # one path component of a file in a version


class Pointer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    version: Annotated[int, Field(ge=1)]
    manifest_sha256: Sha256


class Record(BaseModel):
    """One retained version: its manifest's digest and the chunks of each file, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    manifest_sha256: Sha256
    files: dict[str, list[Sha256]]
    blobs: list[Sha256]  # every blob the version references, once (what pruning un-counts)
    size: Annotated[int, Field(ge=0)]  # the version's bytes, all files together


Action = Literal["installed", "pointed", "current", "none", "failed"]


@dataclass(frozen=True)
class SyncResult:
    domain: str
    action: Action  # installed: downloaded; pointed: a version held here made current; current: nothing to do
    version: int | None = None
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0


# --- reading Redis, every read bounded -----------------------------------------------------------------
def check_keys(conn: Redis, domain: str) -> None:
    """StateError naming any published-versions key of the domain that holds a type kd-daemon never writes."""
    expected = pub_key_types(domain)
    with conn.pipeline(transaction=False) as pipe:
        for key in expected:
            pipe.type(key)
        found = [t.decode() if isinstance(t, bytes) else str(t) for t in pipe.execute()]
    check_key_types(dict(zip(expected, found, strict=True)), expected)


def _bytes(value: bytes | str) -> bytes:
    """A value read from a Redis client made without decode_responses (as kd-daemon makes them)."""
    if not isinstance(value, bytes):
        raise TypeError("kd_client.mirror needs a Redis client without decode_responses=True")
    return value


def _json(raw: bytes, what: str) -> Any:
    try:
        return jsonsafe.loads(raw)
    except ValueError as e:
        raise StateError(f"{what} in Redis is not JSON ({e}); kd-daemon did not write it: delete it") from e


def read_pointer(conn: Redis, domain: str) -> Pointer | None:
    """The domain's current version in Redis (None: nothing published there)."""
    key = pub_current_key(domain)
    raw = _bytes(conn.getrange(key, 0, MAX_POINTER_BYTES))
    if not raw:
        return None
    if len(raw) > MAX_POINTER_BYTES:
        raise StateError(f"Redis key {key} is over {MAX_POINTER_BYTES} bytes; kd-daemon did not write it: delete it")
    try:
        return Pointer.model_validate(_json(raw, f"Redis key {key}"))
    except ValidationError as e:
        raise StateError(f"Redis key {key} is not a version pointer ({e.errors()[0]['msg']}): delete it") from e


def read_record(conn: Redis, domain: str, version: int) -> Record | None:
    key = pub_versions_key(domain)
    size = conn.hstrlen(key, str(version))
    if size > MAX_RECORD_BYTES:
        raise TransferError(f"{key} v{version} is {size} bytes, over {MAX_RECORD_BYTES}: not a version record")
    raw = conn.hget(key, str(version)) if size else None
    if not isinstance(raw, bytes):
        return None
    try:
        return Record.model_validate(_json(raw, f"{key} v{version}"))
    except ValidationError as e:
        raise TransferError(f"{key} v{version} is not a version record ({e.errors()[0]['msg']})") from e


def read_blob(conn: Redis, sha256: str, size: int | None, limit: int) -> bytes:
    """A blob holding exactly its sha256's bytes (and `size` of them when given); at most `limit`
    bytes are read (GETRANGE), whatever the key holds."""
    key, most = pub_blob_key(sha256), size if size is not None else limit
    try:
        data = _bytes(conn.getrange(key, 0, most))  # the end is inclusive: one byte more than allowed shows an oversize
    except ResponseError as e:
        raise TransferError(f"{key} is not a blob ({e})") from e
    if not data:
        raise TransferError(f"{key} is missing from Redis (expired, evicted or deleted)")
    if len(data) > most:
        raise TransferError(f"{key} is larger than {most} bytes (oversized or tampered)")
    if size is not None and len(data) != size:
        raise TransferError(f"{key} holds {len(data)} bytes, not {size} (truncated)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TransferError(f"{key} does not match its sha256 (corrupt or tampered)")
    return data


def published_domains(conn: Redis) -> list[str]:
    """The domains with a pointer in Redis (names that are not domains are skipped with a warning)."""
    out = []
    for raw in conn.smembers(PUB_DOMAINS_KEY):
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            out.append(check_domain(name))
        except ValueError as e:
            log.warning("published_domain_ignored", key=PUB_DOMAINS_KEY, error=str(e))
    return sorted(out)


# --- a version's files, as the manifest names them ---------------------------------------------------
def file_parts(rel: Any) -> tuple[str, ...]:
    """The components of a file path a manifest names: plain names, at most 4 deep, no manifest.json."""
    parts = tuple(rel.split("/")) if isinstance(rel, str) else ()
    if not parts or len(parts) > 4 or not all(_PART.fullmatch(p) for p in parts) or parts == (publisher.MANIFEST,):
        raise SecurityError(f"a manifest names the file {rel!r}, which is not a plain path inside a version")
    return parts


def manifest_files(manifest: dict[str, Any], max_bytes: int) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) of a manifest's files, each path safe, the total within `max_bytes`."""
    try:
        files = {rel: (str(m["sha256"]), int(m["size"])) for rel, m in manifest["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TransferError(f"the manifest is malformed ({type(e).__name__}: {e})") from e
    for rel, (sha, size) in files.items():
        file_parts(rel)
        if not re.fullmatch(r"[0-9a-f]{64}", sha) or size < 0:
            raise TransferError(f"the manifest's entry for {rel} is malformed")
    total = sum(size for _, size in files.values())
    if total > max_bytes:
        raise TransferError(f"the version is {total} bytes, over KD_MAX_ADAPTER_BYTES={max_bytes}")
    return files


def chunk_sizes(size: int) -> list[int]:
    """The lengths of a file's chunks: full chunks of CHUNK_BYTES, then the rest (none for an empty file)."""
    return [min(CHUNK_BYTES, size - at) for at in range(0, size, CHUNK_BYTES)]


# --- push: the worker, inside the domain's publish order ---------------------------------------------
_RESERVE = """
local n = redis.call('incr', KEYS[1])
local floor = tonumber(ARGV[1])
for _, f in ipairs(redis.call('hkeys', KEYS[2])) do
  local v = tonumber(f)
  if v and v + 1 > floor then floor = v + 1 end
end
if n < floor then n = floor; redis.call('set', KEYS[1], n) end
return n
"""


def reserve_number(conn: Redis, domain: str, at_least: int) -> int:
    """The domain's next version number, unique across workers: above every number reserved or
    retained in Redis and at least `at_least` (the worker's own next local number)."""
    check_keys(conn, domain)
    keys = [pub_seq_key(domain), pub_versions_key(domain)]
    return int(conn.register_script(_RESERVE)(keys=keys, args=[at_least]))


# KEYS: current, versions, refs, domains, seq. ARGV: domain, version, manifest sha, record, keep, blob prefix,
# channel, then every blob's sha256 once. Returns {"missing", sha...}, {"exists"}, {"conflict", sha} or
# {"committed", pruned version...}.
_COMMIT = """
local missing = {}
for i = 8, #ARGV do
  if redis.call('exists', ARGV[6] .. ARGV[i]) == 0 then missing[#missing + 1] = ARGV[i] end
end
if #missing > 0 then table.insert(missing, 1, 'missing'); return missing end
local old = redis.call('hget', KEYS[2], ARGV[2])
if old then
  local sha = cjson.decode(old)['manifest_sha256']
  if sha == ARGV[3] then  -- pushed before: blobs sent again (repaired) belong to it for good
    for i = 8, #ARGV do redis.call('persist', ARGV[6] .. ARGV[i]) end
    return {'exists'}
  end
  return {'conflict', tostring(sha)}
end
redis.call('hset', KEYS[2], ARGV[2], ARGV[4])
for i = 8, #ARGV do
  redis.call('persist', ARGV[6] .. ARGV[i])
  redis.call('hincrby', KEYS[3], ARGV[i], 1)
end
local version = tonumber(ARGV[2])
redis.call('set', KEYS[1], cjson.encode({version = version, manifest_sha256 = ARGV[3]}))
redis.call('sadd', KEYS[4], ARGV[1])
if (tonumber(redis.call('get', KEYS[5])) or 0) < version then redis.call('set', KEYS[5], version) end
local held = {}
for _, f in ipairs(redis.call('hkeys', KEYS[2])) do
  local n = tonumber(f)
  if n then held[#held + 1] = {n, f} end
end
table.sort(held, function(a, b) return a[1] < b[1] end)
local out = {'committed'}
for i = 1, #held - tonumber(ARGV[5]) do
  local n, f = held[i][1], held[i][2]
  if n ~= version then
    local rec = cjson.decode(redis.call('hget', KEYS[2], f))
    for _, b in ipairs(rec['blobs']) do
      if redis.call('hincrby', KEYS[3], b, -1) <= 0 then
        redis.call('hdel', KEYS[3], b)
        redis.call('del', ARGV[6] .. b)
      end
    end
    redis.call('hdel', KEYS[2], f)
    out[#out + 1] = n
  end
end
redis.call('publish', ARGV[7], ARGV[1])
return out
"""


@dataclass(frozen=True)
class _Source:
    """Where a chunk's bytes are in the version dir."""

    rel: str
    offset: int
    length: int


def _read_at(version_dir: Path, src: _Source) -> bytes:
    fd = os.open(version_dir.joinpath(*file_parts(src.rel)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, src.length, src.offset)
    finally:
        os.close(fd)


def _chunk(version_dir: Path, rel: str, sha: str, size: int) -> list[tuple[str, _Source]]:
    """The chunks of one file, read once; the file must still be the manifest's."""
    whole, out = hashlib.sha256(), []
    for i, length in enumerate(chunk_sizes(size)):
        src = _Source(rel, i * CHUNK_BYTES, length)
        data = _read_at(version_dir, src)
        whole.update(data)
        out.append((hashlib.sha256(data).hexdigest(), src))
    if whole.hexdigest() != sha:
        raise PublishError(f"{version_dir / rel} does not match its manifest (partial or modified version)")
    return out


def _upload_missing(conn: Redis, version_dir: Path, sources: dict[str, _Source], manifest: bytes, msha: str) -> int:
    """Blobs Redis lacks (or holds at another length) uploaded with a TTL; returns the bytes sent."""
    shas = [msha, *sources]
    with conn.pipeline(transaction=False) as pipe:
        for sha in shas:
            pipe.strlen(pub_blob_key(sha))
        lengths = dict(zip(shas, pipe.execute(), strict=True))
    sent = 0
    for sha in shas:
        length = len(manifest) if sha == msha else sources[sha].length
        if lengths[sha] == length:
            continue
        data = manifest if sha == msha else _read_at(version_dir, sources[sha])
        if hashlib.sha256(data).hexdigest() != sha:
            raise PublishError(f"{version_dir} changed while it was pushed; a published version is immutable")
        if lengths[sha]:  # a blob of the wrong length (truncated?) is replaced; a committed one keeps no TTL
            conn.set(pub_blob_key(sha), data, keepttl=True)
        else:
            conn.set(pub_blob_key(sha), data, ex=PENDING_TTL_S)
        sent += len(data)
    return sent


def push(conn: Redis, version: publisher.Version, keep: int, max_bytes: int) -> dict[str, Any]:
    """Push a local version to Redis and make it the domain's current version there (idempotent:
    a version already pushed is left as it is). Returns what was sent and pruned."""
    domain, t0 = version.domain, time.perf_counter()
    check_keys(conn, domain)
    manifest_bytes = read_nofollow(version.path / publisher.MANIFEST)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise PublishError(f"{version.path / publisher.MANIFEST} is over {MAX_MANIFEST_BYTES} bytes")
    manifest = _json(manifest_bytes, str(version.path / publisher.MANIFEST))
    if not isinstance(manifest, dict) or (manifest.get("domain"), manifest.get("version")) != (domain, version.number):
        raise PublishError(f"{version.path / publisher.MANIFEST} does not name {domain} v{version.number}")
    files: dict[str, list[str]] = {}
    sources: dict[str, _Source] = {}
    listed = manifest_files(manifest, max_bytes)
    for rel, (sha, size) in listed.items():
        chunks = _chunk(version.path, rel, sha, size)
        files[rel] = [c for c, _ in chunks]
        for c, src in chunks:
            sources.setdefault(c, src)
    msha = hashlib.sha256(manifest_bytes).hexdigest()
    blobs = list(dict.fromkeys([msha, *sources]))
    total = sum(size for _, size in listed.values())
    record = Record(manifest_sha256=msha, files=files, blobs=blobs, size=total).model_dump_json()
    keys = [pub_current_key(domain), pub_versions_key(domain), PUB_REFS_KEY, PUB_DOMAINS_KEY, pub_seq_key(domain)]
    commit, sent = conn.register_script(_COMMIT), 0
    try:
        for _ in range(3):  # a blob pruned by a concurrent push between our upload and commit is sent again
            sent += _upload_missing(conn, version.path, sources, manifest_bytes, msha)
            args: list[str | int] = [domain, version.number, msha, record, keep, pub_blob_key(""), PUB_CHANNEL, *blobs]
            reply = [_text(x) for x in commit(keys=keys, args=args)]
            if reply[0] != "missing":
                break
    except ResponseError as e:
        full = isinstance(e, OutOfMemoryError)
        hint = "; Redis is full (maxmemory): lower KD_KEEP_VERSIONS or give Redis more memory" if full else ""
        raise PublishError(f"pushing {domain} v{version.number}: Redis refused it: {e}{hint}") from e
    if reply[0] == "missing":
        raise PublishError(f"pushing {domain} v{version.number}: blobs kept vanishing from Redis ({reply[1:4]})")
    if reply[0] == "conflict":
        raise PublishError(
            f"pushing {domain} v{version.number}: Redis already holds another v{version.number} (manifest "
            f"{reply[1][:12]}); version numbers are reserved in Redis (kd:pub:seq), so another writer numbered it"
        )
    out = {"domain": domain, "version": version.number, "sent_bytes": sent, "version_bytes": total}
    out.update(pruned=[int(n) for n in reply[1:]], existed=reply[0] == "exists", seconds=time.perf_counter() - t0)
    log.info("version_pushed", **out)
    return out


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


_POINT = """
local cur = redis.call('get', KEYS[1])
if not cur then return {'none'} end
local now = cjson.decode(cur)['version']
local best, want = nil, tonumber(ARGV[2])
for _, f in ipairs(redis.call('hkeys', KEYS[2])) do
  local n = tonumber(f)
  local older = not want and n and n < now and (not best or n > best[1])
  if older or (want and n == want) then best = {n, f} end
end
if not best then return {'absent', now} end
local sha = cjson.decode(redis.call('hget', KEYS[2], best[2]))['manifest_sha256']
redis.call('set', KEYS[1], cjson.encode({version = best[1], manifest_sha256 = sha}))
redis.call('publish', ARGV[3], ARGV[1])
return {'ok', best[1], now}
"""


def move_pointer(conn: Redis, domain: str, to: int | None = None) -> tuple[int, int]:
    """Roll back in Redis: point the domain at a retained version, `to` or the one before the
    current; returns (from, to). Consumers follow at their next pass."""
    check_keys(conn, domain)
    keys = [pub_current_key(domain), pub_versions_key(domain)]
    reply = [
        _text(x) for x in conn.register_script(_POINT)(keys=keys, args=[domain, "" if to is None else to, PUB_CHANNEL])
    ]
    if reply[0] == "none":
        raise PublishError(f"nothing is published in Redis for {domain!r}; nothing to roll back")
    if reply[0] == "absent":
        kept = sorted(int(v) for v in conn.hkeys(pub_versions_key(domain)) if v.isdigit())
        wanted = f"version {to}" if to is not None else f"a version before v{reply[1]}"
        raise PublishError(f"Redis keeps no {wanted} of {domain}; retained versions: {kept}")
    return int(reply[2]), int(reply[1])


def rollback(
    settings: ClientSettings, connect: Callable[[], Redis], domain: str, to: int | None = None
) -> tuple[int, list[str]]:
    """Roll `domain` back where its history lives, for `kd-client rollback` and the dashboard: the local
    directory alone (KD_PUBLISH_TO=local and KD_ADAPTERS_SOURCE=local; Redis is not used), else the
    pointer in Redis that every consumer follows, then this machine's directory from it (unless it only
    publishes to Redis). Returns the version now current and what moved, one line each."""
    if settings.publish_to == "local" and settings.adapters_source == "local":
        v = publisher.rollback(settings.adapters_dir, domain, to)
        return v.number, [f"{domain}: current is now v{v.number} ({v.path})"]
    conn = connect()
    was, now = move_pointer(conn, domain, to)
    lines = [f"{domain}: current in Redis is now v{now} (was v{was}); every consumer follows"]
    if settings.publish_to != "redis":  # this machine's adapters_dir follows at once
        lines.append(
            describe(
                sync_domain(conn, settings.adapters_dir, domain, settings.keep_versions, settings.max_adapter_bytes)
            )
        )
    return now, lines


# --- pull: consumers -----------------------------------------------------------------------------------
def _manifest_sha(version_dir: Path) -> str | None:
    try:
        return hashlib.sha256(read_nofollow(version_dir / publisher.MANIFEST)).hexdigest()
    except OSError:
        return None


def _write_file(conn: Redis, stage_fd: int, rel: str, size: int, chunks: list[str]) -> None:
    """One file of a version, chunk by chunk, created under the stage without following any link."""
    parts, fds = file_parts(rel), [stage_fd]
    expected = chunk_sizes(size)
    if len(chunks) != len(expected):
        raise TransferError(f"{rel}: Redis lists {len(chunks)} chunks for {size} bytes, not {len(expected)}")
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fds[-1])
            except FileExistsError:
                pass
            fds.append(open_dir(Path(rel), part, fds[-1]))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(parts[-1], flags, 0o644, dir_fd=fds[-1]), "wb") as f:
            for sha, length in zip(chunks, expected, strict=True):
                f.write(read_blob(conn, sha, length, CHUNK_BYTES))
    finally:
        for fd in fds[1:]:
            os.close(fd)


def _writer(conn: Redis, files: dict[str, tuple[str, int]], record: Record) -> Callable[[Path], None]:
    def write(stage: Path) -> None:
        fd = open_dir(stage)
        try:
            for rel, (_, size) in files.items():
                _write_file(conn, fd, rel, size, record.files[rel])
        finally:
            os.close(fd)

    return write


def _held(root: Path, domain: str, number: int) -> publisher.Version | None:
    return next((v for v in publisher.versions(root, domain) if v.number == number), None)


def apply_pointer(conn: Redis, root: Path, domain: str, pointer: Pointer, keep: int, max_bytes: int) -> SyncResult:
    """Make the pointer's version current in `root`: nothing to do, point at a version held here, or
    download, verify and install it (TransferError, StateError: the previous version stays current)."""
    t0 = time.perf_counter()
    n = pointer.version
    current = publisher.resolve(root, domain)
    if current is not None and current.number == n and _manifest_sha(current.path) == pointer.manifest_sha256:
        return SyncResult(domain, "current", n)
    held = _held(root, domain, n)
    if held is not None:
        if _manifest_sha(held.path) != pointer.manifest_sha256:
            raise StateError(
                f"{held.path} is not the {domain} v{n} published in Redis (another manifest): this directory also "
                "gets versions from elsewhere; give `kd-client sync` a directory of its own (--adapters)"
            )
        publisher.rollback(root, domain, to=n)  # verifies the files, swaps `current`
        return SyncResult(domain, "pointed", n, seconds=time.perf_counter() - t0)
    record = read_record(conn, domain, n)
    if record is None or record.manifest_sha256 != pointer.manifest_sha256:
        raise TransferError(f"Redis points {domain} at v{n}, but holds no record of that version")
    manifest_bytes = read_blob(conn, pointer.manifest_sha256, None, MAX_MANIFEST_BYTES)
    manifest = _json(manifest_bytes, f"the manifest of {domain} v{n}")
    if not isinstance(manifest, dict) or (manifest.get("domain"), manifest.get("version")) != (domain, n):
        raise TransferError(f"the manifest Redis holds for {domain} v{n} names another domain or version")
    files = manifest_files(manifest, max_bytes)
    if set(files) != set(record.files):
        raise TransferError(f"Redis lists other files for {domain} v{n} than its manifest does")
    publisher.install(root, domain, n, _writer(conn, files, record), manifest_bytes, keep)
    size = sum(s for _, s in files.values())
    return SyncResult(domain, "installed", n, bytes=size, seconds=time.perf_counter() - t0)


def sync_domain(conn: Redis, root: Path, domain: str, keep: int = 5, max_bytes: int = 1 << 30) -> SyncResult:
    """Mirror one domain's current version from Redis into `root` (adapters_kd/)."""
    check_keys(conn, domain)
    pointer = read_pointer(conn, domain)
    if pointer is None:
        return SyncResult(domain, "none")
    return apply_pointer(conn, Path(root), domain, pointer, keep, max_bytes)


class Mirror:
    """The consumer's loop: mirror the published domains from Redis into `root`, once or following.

    `follow` wakes on a pointer move (pub/sub on kd:pub:changed, which the push and rollback scripts
    PUBLISH) and every `poll_s` regardless (a message is lost while disconnected); Redis going away
    is waited out with backoff. A version that fails to install is retried after `retry_s`, or at
    once when the pointer moves on; meanwhile the previous version stays current.
    """

    def __init__(
        self,
        conn: Redis,
        root: Path | str,
        domains: Iterable[str] | None = None,
        *,
        keep: int = 5,
        max_bytes: int = 1 << 30,
        poll_s: float = 2.0,
        retry_s: float = 30.0,
    ):
        self.conn, self.root = conn, Path(root).absolute()
        self.domains = None if domains is None else tuple(publisher.domain_dir(self.root, d).name for d in domains)
        self.keep, self.max_bytes, self.poll_s, self.retry_s = keep, max_bytes, poll_s, retry_s
        self._failed: dict[str, tuple[Pointer | None, float, str]] = {}  # domain -> (pointer, retry at, error)

    @classmethod
    def from_settings(cls, settings: ClientSettings, root: Path | str, domains: Iterable[str] | None = None) -> Mirror:
        from kd_client.queue import connect

        return cls(
            connect(settings),
            root,
            domains,
            keep=settings.keep_versions,
            max_bytes=settings.max_adapter_bytes,
            poll_s=settings.sync_poll_s,
        )

    def sync_once(self) -> list[SyncResult]:
        """One pass over the domains; a domain's failure is its result, never the others'."""
        return [self._sync(domain) for domain in (self.domains or published_domains(self.conn))]

    def _sync(self, domain: str) -> SyncResult:
        pointer: Pointer | None = None
        try:
            check_keys(self.conn, domain)
            pointer = read_pointer(self.conn, domain)
            failed = self._failed.get(domain)
            if failed is not None and failed[0] == pointer and time.monotonic() < failed[1]:
                return SyncResult(domain, "failed", pointer.version if pointer else None, failed[2])
            result = (
                SyncResult(domain, "none")
                if pointer is None
                else apply_pointer(self.conn, self.root, domain, pointer, self.keep, self.max_bytes)
            )
        except (KDError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            log.warning("sync_failed", domain=domain, version=pointer.version if pointer else None, error=error)
            self._failed[domain] = (pointer, time.monotonic() + self.retry_s, error)
            return SyncResult(domain, "failed", pointer.version if pointer else None, error)
        self._failed.pop(domain, None)
        if result.action in ("installed", "pointed"):
            log.info("version_synced", domain=domain, version=result.version, action=result.action, bytes=result.bytes)
        return result

    def follow(self, stop: threading.Event, on_pass: Callable[[list[SyncResult]], None]) -> None:
        """Sync, hand each pass's results to `on_pass`, wait for a change; until `stop` is set."""
        pubsub: PubSub | None = None
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    if pubsub is None:  # subscribed before the pass: a move during it is not missed
                        pubsub = self.conn.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(PUB_CHANNEL)
                    results = self.sync_once()
                    backoff = 0.5
                    on_pass(results)
                    self._wait(pubsub, stop)
                except RedisError as e:
                    log.warning("sync_redis_unavailable", error=str(e), retry_s=backoff)
                    _close(pubsub)
                    pubsub = None
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            _close(pubsub)

    def _wait(self, pubsub: PubSub, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.poll_s
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if pubsub.get_message(timeout=min(left, 0.2)) is not None:
                while pubsub.get_message(timeout=0) is not None:  # a burst of moves is one pass
                    pass
                return


def _close(pubsub: PubSub | None) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except RedisError:
            pass


def describe(result: SyncResult) -> str:
    """One line per domain for a terminal."""
    head = f"{result.domain}:"
    if result.action == "installed":
        return f"{head} v{result.version} installed ({result.bytes / 1e6:.1f} MB in {result.seconds:.2f} s)"
    if result.action == "pointed":
        return f"{head} v{result.version} is current again (held here)"
    if result.action == "current":
        return f"{head} v{result.version} is current"
    if result.action == "none":
        return f"{head} nothing published in Redis"
    kept = f"v{result.version} " if result.version else ""
    return f"{head} {kept}not installed, the previous version stays current: {result.error}"
