"""The reader side of adapters_kd/: the watcher (once per version, bursts, stop, polling, bad
versions) and a reader hammering mlx_lm.load while another process publishes 50 versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
from helpers import REPO, wait_for

from jobs import publisher
from kd_client.watcher import AdapterUpdate, AdapterWatcher, WatcherFailed

POLLING = [pytest.param(False, id="native"), pytest.param(True, id="polling")]


def write_files(tag: int):
    def write(stage: Path) -> None:
        for name in ("adapters.safetensors", "adapter_config.json", "kd_metrics.json"):
            (stage / name).write_text(json.dumps({"tag": tag, "file": name}))

    return write


def publish(root: Path, tag: int, domain: str = "memory") -> publisher.Version:
    return publisher.publish(root, domain, write_files(tag), {"tag": tag}, keep=20)


class Recorder:
    """on_change target: what the watcher reported, in order (appended from its thread)."""

    def __init__(self, gate: threading.Event | None = None):
        self.seen: list[AdapterUpdate] = []
        self.gate = gate  # when set: the first report blocks until the test opens the gate

    def __call__(self, update: AdapterUpdate) -> None:
        self.seen.append(update)
        if self.gate is not None and len(self.seen) == 1:
            self.gate.wait(60)

    def versions(self, domain: str = "memory") -> list[int]:
        return [u.version for u in self.seen if u.domain == domain]


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "adapters_kd").mkdir()
    return tmp_path / "adapters_kd"


def test_the_client_package_never_imports_mlx_or_the_worker():
    code = (
        "import sys, kd_client, kd_client.watcher, kd_client.hotswap, kd_client.follow; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'kd_worker')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize("polling", POLLING)
def test_each_distinct_version_is_reported_once(root, polling):
    publish(root, 1)
    rec = Recorder()
    with AdapterWatcher(root, on_change=rec, force_polling=polling) as w:
        assert w.wait_ready(10)
        wait_for(lambda: rec.versions() == [1], 10, what="the version current at start")
        for tag in (2, 3):
            publish(root, tag)
            wait_for(lambda t=tag: w.reported.get("memory") == t, 10, what=f"memory v{tag}")
        publish(root, 1, domain="task")  # a domain that appears later; its report follows every rescan above
        wait_for(lambda: rec.versions("task") == [1], 10, what="the new domain")
        assert rec.versions() == [1, 2, 3]
        assert all(
            u.manifest["version"] == u.version and u.path == root / u.domain / "versions" / f"{u.version:04d}"
            for u in rec.seen
        )
        assert {u.domain: u.version for u in w.take(0)} == {"memory": 3, "task": 1}  # newest per domain
        assert w.stop(5)


@pytest.mark.parametrize("polling", POLLING)
def test_a_burst_of_publishes_reports_only_the_newest(root, polling):
    gate = threading.Event()
    rec = Recorder(gate)
    with AdapterWatcher(root, domains=["memory"], on_change=rec, force_polling=polling) as w:
        assert w.wait_ready(10)
        publish(root, 1)
        wait_for(lambda: rec.versions() == [1], 10, what="v1")  # the watcher thread now waits in on_change
        for tag in range(2, 7):
            publish(root, tag)
        publish(root, 1, domain="task")  # not watched
        gate.set()
        wait_for(lambda: w.reported.get("memory") == 6, 10, what="v6")
        assert rec.versions() == [1, 6] and not rec.versions("task")


@pytest.mark.parametrize("polling", POLLING)
def test_stop_is_prompt_and_wakes_a_waiting_consumer(root, polling):
    publish(root, 1)
    rec = Recorder()
    w = AdapterWatcher(root, on_change=rec, force_polling=polling, rescan_s=30).start()  # watch() blocks 30 s
    wait_for(lambda: rec.versions() == [1], 10, what="the start-up scan")
    assert [u.version for u in w.take(0)] == [1]
    taken: list = []
    consumer = threading.Thread(target=lambda: taken.append(w.take(timeout=60)))
    consumer.start()
    assert w.stop(timeout=5), "the watcher thread did not end"
    consumer.join(5)
    assert not consumer.is_alive() and taken == [[]]
    assert w.error is None and not w.running


def test_a_watcher_that_dies_hands_its_error_to_the_consumer(tmp_path):
    root = tmp_path / "adapters_kd"
    root.mkdir()
    w = AdapterWatcher(root, rescan_s=0.2).start()
    assert w.wait_ready(10)
    root.rmdir()
    root.write_text("not a directory any more")
    with pytest.raises(WatcherFailed, match="Not a directory"):
        list(w.updates(wait_s=10))
    assert w.stop(5) and isinstance(w.error, NotADirectoryError)


def _point_at(root: Path, domain: str, number: int) -> None:
    """Swap `current` by hand, as a foreign writer or bit rot would leave things."""
    d = root / domain
    tmp = d / ".current.test"
    os.symlink(f"versions/{number:04d}", tmp)
    os.replace(tmp, d / "current")


@pytest.mark.parametrize("polling", POLLING)
def test_a_partial_or_modified_version_is_never_reported(root, polling):
    rec = Recorder()
    with AdapterWatcher(root, on_change=rec, force_polling=polling, verify_attempts=2) as w:
        assert w.wait_ready(10)
        v1 = publish(root, 1)
        wait_for(lambda: rec.versions() == [1], 10, what="v1")
        partial = root / "memory" / "versions" / "0002"
        partial.mkdir()
        (partial / "adapters.safetensors").write_text("half a file")  # no manifest
        _point_at(root, "memory", 2)
        wait_for(lambda: w.invalid.get("memory") == 2, 10, what="v2 refused")
        modified = root / "memory" / "versions" / "0003"
        modified.mkdir()
        for f in v1.path.iterdir():
            (modified / f.name).write_bytes(f.read_bytes())
        (modified / "kd_metrics.json").write_text("edited after publishing")
        _point_at(root, "memory", 3)
        wait_for(lambda: w.invalid.get("memory") == 3, 10, what="v3 refused")
        assert publish(root, 4).number == 4
        wait_for(lambda: w.reported.get("memory") == 4, 10, what="v4")
        assert rec.versions() == [1, 4]


# -- the hammer: 50 publishes in another process while this one reads and watches ---------------

PUBLISHER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from jobs import publisher
from lora_fixtures import write_adapter
root, shapes, n = sys.argv[2], json.loads(open(sys.argv[3]).read()), int(sys.argv[4])
for tag in range(1, n + 1):
    sys.stdin.readline()  # one publish per request: interleaves the two without sleeps
    publisher.publish(root, "memory", lambda stage: write_adapter(stage, shapes, tag), {"tag": tag}, keep=n)
    print(f"published {tag}", flush=True)
sys.stdin.read()  # until the test has read the last version and closes the pipe
"""


class Publisher:
    """The publishing process: `request()` asks for the next version, `settle()` waits until every
    requested version is current."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.sent, self.acked = proc, 0, 0

    def request(self) -> None:
        self.proc.stdin.write("next\n")
        self.proc.stdin.flush()
        self.sent += 1

    def settle(self) -> None:
        while self.acked < self.sent:
            line = self.proc.stdout.readline()
            assert line == f"published {self.acked + 1}\n", f"the publishing process said {line!r}"
            self.acked += 1


class HammerReader:
    """Resolve once, verify checksums, mlx_lm.load the version; check every byte is that version's."""

    def __init__(self, root: Path, student: Path, shapes):
        self.root, self.student, self.shapes = root, student, shapes
        self.reads = self.compat_reads = self.straddled = 0
        self.versions: set[int] = set()
        self._expected: dict[int, dict] = {}

    def expected(self, tag: int) -> dict:
        from lora_fixtures import lora_weights

        if tag not in self._expected:
            self._expected[tag] = lora_weights(self.shapes, tag)
        return self._expected[tag]

    def loaded_weights(self, adapter_path: Path, hold=None) -> dict:
        """mlx_lm.load with the adapter; `hold()` runs between mlx-lm's two reads of the version
        (adapter_config.json, then adapters.safetensors)."""
        from unittest import mock

        import mlx_lm
        import mlx_lm.tuner.utils as tuner_utils
        import numpy as np
        from mlx.utils import tree_flatten

        wrap = tuner_utils.linear_to_lora_layers

        def between_reads(*args, **kwargs):
            hold()
            return wrap(*args, **kwargs)

        with mock.patch.object(tuner_utils, "linear_to_lora_layers", between_reads) if hold else nullcontext():
            model, _ = mlx_lm.load(str(self.student), adapter_path=str(adapter_path))
        return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k in self.shapes}

    def read(self, hold=None) -> tuple[int, int] | None:
        """(version read, version current after the read); every byte read must be that version's."""
        import numpy as np

        v = publisher.resolve(self.root, "memory")
        if v is None:
            return None
        manifest = publisher.verify(v.path)  # raises on a partial or modified version
        weights = self.loaded_weights(v.path, hold)
        tags = {
            manifest["summary"]["tag"],
            manifest["version"],
            json.loads((v.path / "kd_metrics.json").read_text())["tag"],
            json.loads((v.path / "adapter_config.json").read_text())["kd"]["tag"],
        }
        assert tags == {v.number}, f"mixed version {v.number}: {tags}"
        want = self.expected(v.number)
        assert weights.keys() == want.keys() and all(np.array_equal(weights[k], want[k]) for k in want)
        self.reads += 1
        self.versions.add(v.number)
        now = publisher.resolve(self.root, "memory").number
        self.straddled += now != v.number
        return v.number, now

    def read_compat(self) -> None:
        """Through the seed's links: the weights must be exactly one published version's."""
        import numpy as np

        weights = self.loaded_weights(self.root / "memory")
        first = sorted(weights)[0]
        tags = [t for t in range(1, 51) if np.array_equal(weights[first], self.expected(t)[first])]
        assert len(tags) == 1 and all(np.array_equal(weights[k], self.expected(tags[0])[k]) for k in weights)
        self.compat_reads += 1


def test_readers_never_see_a_partial_or_mixed_version_during_50_publishes(root, models_root, tmp_path):
    from lora_fixtures import lora_shapes

    n = 50
    student = models_root / "student"
    shapes = lora_shapes(student)
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    # native with the default debounce, native reporting often (verifies during the publishes), polling
    kinds = {"native": (False, 1600), "native-100ms": (False, 100), "polling": (True, 1600)}
    watched = {k: Recorder() for k in kinds}
    watchers = [
        AdapterWatcher(root, on_change=watched[k], force_polling=p, debounce_ms=d).start()
        for k, (p, d) in kinds.items()
    ]
    assert all(w.wait_ready(10) for w in watchers)
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(REPO / "tests"), str(root), str(tmp_path / "shapes.json"), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    pub, reader, held = Publisher(proc), HammerReader(root, student, shapes), 0

    def publish_during_the_read() -> None:
        pub.request()
        pub.settle()  # the next version is current while this read sits between its two file reads

    try:
        pub.request()
        while n not in reader.versions:
            assert proc.poll() is None, "the publishing process failed"
            if reader.reads % 2 and pub.sent < n:
                # every other read is held across a swap: deterministic, not left to scheduling
                pub.settle()
                read, current = reader.read(hold=publish_during_the_read)
                assert current == read + 1 == pub.acked, (read, current)
                held += 1
            elif reader.read():  # the other reads race the publisher freely
                reader.read_compat()
                if pub.sent < n:
                    pub.request()
        pub.settle()
        proc.stdin.close()
        assert proc.wait(60) == 0
        wait_for(lambda: all(w.reported.get("memory") == n for w in watchers), 20, what="both watchers at v50")
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in watchers:
            w.stop()
    print(
        f"hammer: {reader.reads} verified loads ({held} held across a swap), {reader.compat_reads} loads through "
        f"the links, {len(reader.versions)} distinct versions read, {reader.straddled} reads overlapped a swap; "
        f"watcher reports { ({k: len(r.seen) for k, r in watched.items()}) }"
    )
    assert held == n // 2 - 1 and reader.straddled >= held  # a swap happened during each held read
    assert reader.reads >= n and n in reader.versions
    for rec in watched.values():
        got = rec.versions()
        assert got == sorted(set(got)) and got[-1] == n, got  # once each, in order, ending at the newest
