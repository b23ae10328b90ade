"""kd_worker/ops/runstate.py: the record of why the worker last stopped, printed by `kd-worker service status`."""

from __future__ import annotations

import os

from structlog.testing import capture_logs

from kd_worker.ops import runstate


def test_each_state_round_trips_and_reads_as_a_sentence(tmp_path):
    runstate.record(tmp_path, runstate.RUNNING, "kd-worker run started")
    entry = runstate.read(tmp_path)
    assert entry is not None and entry["pid"] == os.getpid() and entry["exit_code"] is None
    assert runstate.describe(entry).startswith("started at ")
    runstate.record(tmp_path, runstate.CONFIG_ERROR, "KD_TEACHER is not set", 0)
    entry = runstate.read(tmp_path)
    assert entry is not None and entry["state"] == "config_error"
    text = runstate.describe(entry)
    assert text.startswith("stopped on a configuration error at ") and text.endswith(
        "exit code 0): KD_TEACHER is not set"
    )
    runstate.record(tmp_path, runstate.FAILED, "the work loop ended unexpectedly", 1)
    assert runstate.describe(runstate.read(tmp_path) or {}).startswith("failed at ")
    assert [p.name for p in tmp_path.iterdir()] == [runstate.STATE_NAME]  # written in place atomically


def test_a_missing_or_foreign_file_is_no_record(tmp_path):
    assert runstate.read(tmp_path) is None
    runstate.state_path(tmp_path).write_text("not json")
    assert runstate.read(tmp_path) is None
    runstate.state_path(tmp_path).write_text('{"state": "dancing"}')
    assert runstate.read(tmp_path) is None


def test_an_unwritable_work_dir_is_logged_not_raised(tmp_path):
    blocker = tmp_path / "work"
    blocker.write_text("a file where the work dir should be")
    with capture_logs() as logs:
        runstate.record(blocker, runstate.CONFIG_ERROR, "KD_WORK_DIR is a file", 78)
    assert [e["event"] for e in logs] == ["run_state_not_written"]
