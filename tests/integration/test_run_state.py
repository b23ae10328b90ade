"""`kd-worker run` records why it stopped; `kd-worker service status` prints it. A configuration error under
launchd (`--config-error-exit 0`) exits 0, so KeepAlive {SuccessfulExit: false} leaves the agent down instead
of reloading the teacher every ThrottleInterval; under systemd it stays 78 (RestartPreventExitStatus=78)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from helpers import REPO, venv_bin

from kd_worker.ops import runstate, units
from kd_worker.ops.units import LABEL
from kd_worker.settings import WorkerSettings


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_bin("kd-worker"), *args], env=env, capture_output=True, text=True, timeout=120)


def record(env: dict[str, str]) -> dict:
    entry = runstate.read(Path(env["KD_WORK_DIR"]))
    assert entry is not None
    return entry


def test_a_configuration_error_under_launchd_exits_0_and_records_why(env):
    bad = {k: v for k, v in env.items() if k != "KD_TEACHER"}
    out = run(bad, "run", "--config-error-exit", "0")
    assert out.returncode == 0
    assert "KD_TEACHER is not set" in out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e.get("level") == "error"] == ["configuration_error"]  # in the log
    entry = record(bad)
    assert entry["state"] == runstate.CONFIG_ERROR and entry["exit_code"] == 0
    assert "KD_TEACHER is not set" in entry["reason"]


def test_without_the_flag_it_is_78_and_recorded(env):
    bad = dict(env, KD_TEACHER=str(Path(env["KD_WORK_DIR"]) / "no-model"))
    out = run(bad, "run")
    assert out.returncode == 78
    assert record(bad)["exit_code"] == 78 and "KD_TEACHER=" in record(bad)["reason"]


def test_an_invalid_setting_is_recorded_in_the_work_dir_too(env):
    bad = dict(env, KD_REDIS_URL="http://nope")
    out = run(bad, "run", "--config-error-exit", "0")
    assert out.returncode == 0 and "KD_REDIS_URL" in out.stderr
    entry = record(bad)
    assert entry["state"] == runstate.CONFIG_ERROR and "KD_REDIS_URL" in entry["reason"]


def test_a_requested_stop_is_recorded(env, worker):
    w = worker()
    running = record(env)
    assert running["state"] == runstate.RUNNING and running["pid"] == w.proc.pid
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0
    entry = record(env)
    assert (entry["state"], entry["exit_code"]) == (runstate.STOPPED, 0)


def test_service_status_says_why_the_agent_stopped(env, tmp_path):
    """End to end on Linux: the worker stops on a bad setting, then `kd-worker service status` (launchd, with
    the recorded fake launchctl) prints the reason from the work dir the installed plist names."""
    bad = {k: v for k, v in env.items() if k != "KD_STUDENT"}
    assert run(bad, "run", "--config-error-exit", "0").returncode == 0
    home = tmp_path / "home"
    host = units.host_for("launchd", home=home, uid=501)
    plist = host.agents_dir / f"{LABEL}.plist"
    plist.parent.mkdir(parents=True)
    plist.write_text(units.render_worker_plist(host, WorkerSettings(work_dir=Path(env["KD_WORK_DIR"]))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "launchctl").symlink_to(REPO / "tests" / "fakes" / "launchctl")
    status_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),  # where the agent's plist is; KD_WORK_DIR deliberately not set in this shell
        "FAKE_LAUNCHCTL_STATE": str(tmp_path / "launchd"),
        "FAKE_LAUNCHCTL_LOG": str(tmp_path / "launchctl.log"),
    }
    out = run(status_env, "service", "status", "--manager", "launchd")
    assert out.returncode == 113, out.stderr  # the fake has no agent loaded: launchctl print says so
    assert "stopped on a configuration error" in out.stdout and "KD_STUDENT is not set" in out.stdout
    assert "fix it, then start it: launchctl kickstart gui/" in out.stdout
    assert (tmp_path / "launchctl.log").read_text().strip().split("\t")[1:3] == ["print", f"gui/{os.getuid()}/{LABEL}"]
