"""Checkpoints that cannot be trusted: a save killed half-way, a truncated or garbled latest
checkpoint. The store falls back to the newest good one with a `checkpoint_unusable` warning, or
to a fresh start, and never hands the trainer damaged arrays."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from structlog.testing import capture_logs

from kd_worker.engine.checkpoints import ARRAYS, STATE, DirCheckpointStore


def arrays(step: int) -> dict[str, mx.array]:
    rng = np.random.default_rng(step)
    return {
        "adapter.layers.0.lora_a": mx.array(rng.normal(size=(64, 8)).astype(np.float32)),
        "optimizer.layers.0.lora_a.v": mx.array(rng.normal(size=(64, 8)).astype(np.float32)),
    }


@pytest.fixture
def store(tmp_path) -> DirCheckpointStore:
    s = DirCheckpointStore(tmp_path / "checkpoints")
    for step in (10, 20, 30):
        s.save(step, arrays(step), {"step": step, "history": {"train": [{"step": step}]}})
    return s


def step_dir(s: DirCheckpointStore, step: int) -> Path:
    return s.root / f"step_{step:07d}"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    """One byte of tensor data changed, the file still a valid safetensors file (mx.load reads it)."""
    data = bytearray(path.read_bytes())
    data[-17] ^= 0x40
    path.write_bytes(bytes(data))
    assert set(mx.load(str(path))) == set(arrays(0))


def garble_json(path: Path) -> None:
    path.write_text(path.read_text()[:-9])


def assert_is_step(found, step: int) -> None:
    assert found is not None and found[0] == step and found[2]["step"] == step
    for k, v in arrays(step).items():
        assert np.array_equal(np.array(found[1][k]), np.array(v)), k
    assert found[2]["history"] == {"train": [{"step": step}]}


def test_a_good_latest_checkpoint_loads_exactly(store):
    with capture_logs() as logs:
        assert_is_step(store.latest(), 30)
    assert not [e for e in logs if e["event"] == "checkpoint_unusable"]


@pytest.mark.parametrize(
    ("damage", "file"),
    [(truncate, ARRAYS), (flip_byte, ARRAYS), (garble_json, STATE), (Path.unlink, ARRAYS)],
    ids=["truncated", "garbled-tensor-bytes", "garbled-state", "arrays-missing"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(store, damage, file):
    damage(step_dir(store, 30) / file)
    with capture_logs() as logs:
        found = store.latest()
    assert_is_step(found, 20)
    (warning,) = [e for e in logs if e["event"] == "checkpoint_unusable"]
    assert warning["log_level"] == "warning" and warning["step"] == 30 and file in warning["reason"]
    assert store.steps() == [10, 20]  # dropped: never published, never tried again


def test_damage_everywhere_means_a_fresh_start(store):
    truncate(step_dir(store, 30) / ARRAYS)
    flip_byte(step_dir(store, 20) / ARRAYS)
    garble_json(step_dir(store, 10) / STATE)
    with capture_logs() as logs:
        assert store.latest() is None
    assert sorted(e["step"] for e in logs if e["event"] == "checkpoint_unusable") == [10, 20, 30]
    assert store.steps() == []


def test_an_older_damaged_checkpoint_is_dropped_too(store):
    """Older checkpoints are published with the adapter (checkpoint_N/): a damaged one must go."""
    flip_byte(step_dir(store, 10) / ARRAYS)
    with capture_logs() as logs:
        assert_is_step(store.latest(), 30)
    assert [e["step"] for e in logs if e["event"] == "checkpoint_unusable"] == [10]
    assert store.steps() == [20, 30]


def test_a_save_killed_half_way_is_ignored_and_cleaned(store):
    stage = store.root / ".step_0000040.4242.tmp"  # what a kill between mkdir and rename leaves
    stage.mkdir()
    (stage / ARRAYS).write_bytes(b"half a file")
    assert_is_step(store.latest(), 30)
    assert not stage.exists() and store.steps() == [10, 20, 30]


def test_a_checkpoint_of_another_step_is_refused(store):
    state = json.loads((step_dir(store, 30) / STATE).read_text())
    (step_dir(store, 30) / STATE).write_text(json.dumps({**state, "step": 20}))
    assert_is_step(store.latest(), 20)


def test_a_checkpoint_saved_before_checksums_still_loads(store):
    path = step_dir(store, 30) / STATE
    state = json.loads(path.read_text())
    del state["state_sha256"]
    path.write_text(json.dumps(state))
    assert_is_step(store.latest(), 30)
    truncate(step_dir(store, 30) / ARRAYS)  # unreadable without a checksum: still caught
    assert_is_step(store.latest(), 20)
