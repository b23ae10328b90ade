"""The reader side of adapters_kd/: the watcher (once per version, bursts, stop, polling, bad
versions) and a reader hammering mlx_lm.load while another process publishes 50 versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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
    sys.stdin.readline()  # one publish per finished read: interleaves the two without sleeps
    publisher.publish(root, "memory", lambda stage: write_adapter(stage, shapes, tag), {"tag": tag}, keep=n)
sys.stdin.read()  # until the test has read the last version and closes the pipe
"""


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

    def loaded_weights(self, adapter_path: Path) -> dict:
        import mlx_lm
        import numpy as np
        from mlx.utils import tree_flatten

        model, _ = mlx_lm.load(str(self.student), adapter_path=str(adapter_path))
        return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k in self.shapes}

    def read(self) -> bool:
        import numpy as np

        v = publisher.resolve(self.root, "memory")
        if v is None:
            return False
        manifest = publisher.verify(v.path)  # raises on a partial or modified version
        tags = {
            manifest["summary"]["tag"],
            manifest["version"],
            json.loads((v.path / "kd_metrics.json").read_text())["tag"],
            json.loads((v.path / "adapter_config.json").read_text())["kd"]["tag"],
        }
        assert tags == {v.number}, f"mixed version {v.number}: {tags}"
        weights = self.loaded_weights(v.path)
        want = self.expected(v.number)
        assert weights.keys() == want.keys() and all(np.array_equal(weights[k], want[k]) for k in want)
        self.reads += 1
        self.versions.add(v.number)
        self.straddled += publisher.resolve(self.root, "memory").number != v.number
        return True

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
        cwd=REPO,
        text=True,
    )
    reader = HammerReader(root, student, shapes)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        while n not in reader.versions:
            assert proc.poll() is None, "the publishing process failed"
            if reader.read():
                reader.read_compat()
                proc.stdin.write("next\n")
                proc.stdin.flush()
        proc.stdin.close()
        assert proc.wait(60) == 0
        wait_for(lambda: all(w.reported.get("memory") == n for w in watchers), 20, what="both watchers at v50")
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in watchers:
            w.stop()
    print(
        f"hammer: {reader.reads} verified loads, {reader.compat_reads} loads through the links, "
        f"{len(reader.versions)} distinct versions read, {reader.straddled} reads overlapped a swap; "
        f"watcher reports { ({k: len(r.seen) for k, r in watched.items()}) }"
    )
    assert reader.reads >= n and n in reader.versions
    for rec in watched.values():
        got = rec.versions()
        assert got == sorted(set(got)) and got[-1] == n, got  # once each, in order, ending at the newest
