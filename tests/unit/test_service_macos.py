"""`kd-worker service` against launchd's races, run on Linux: the real plans and `service.apply` drive the
recorded fakes of launchctl and scutil (tests/fakes/, where each behaviour's source is noted), on a fake clock.
Also: no install as root, privacy-protected folders, the pinned worker name, and why the worker stopped."""

from __future__ import annotations

import os
import plistlib
from pathlib import Path

import pytest
from helpers import REPO

from jobs.errors import ConfigError
from kd_worker.ops import runstate, service, units
from kd_worker.ops.units import LABEL, REDIS_LABEL, UNIT
from kd_worker.settings import WorkerSettings

FAKES = REPO / "tests" / "fakes"
DOM = "gui/501"
WORKER, REDIS = f"{DOM}/{LABEL}", f"{DOM}/{REDIS_LABEL}"


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch):
    for key in list(os.environ):
        if key.startswith("KD_"):
            monkeypatch.delenv(key)


class FakeTimer(service.Timer):
    """A clock that only moves when the code sleeps: waits are checked, and take no time."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []
        super().__init__(clock=lambda: self.now, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Launchd:
    """The recorded fake launchctl on PATH, its state directory and its log of calls."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.state, self.log = tmp_path / "launchd", tmp_path / "launchctl.log"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("launchctl", "scutil"):
            (bin_dir / tool).symlink_to(FAKES / tool)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_LAUNCHCTL_STATE", str(self.state))
        monkeypatch.setenv("FAKE_LAUNCHCTL_LOG", str(self.log))

    def set(self, services: tuple[str, ...] = (), exit_polls: int = 0, bootstrap_errors: tuple[int, ...] = ()) -> None:
        """Loaded `services`, a booted-out instance exiting after `exit_polls` prints, queued bootstrap errors."""
        (self.state / "services").mkdir(parents=True)
        for target in services:
            (self.state / "services" / target.replace("/", "#")).write_text("old.plist")
        (self.state / "exit_polls").write_text(str(exit_polls))
        (self.state / "bootstrap_errors").write_text("".join(f"{code}\n" for code in bootstrap_errors))

    def services(self) -> dict[str, str]:
        """Loaded target -> its plist."""
        return {p.name.replace("#", "/"): p.read_text() for p in (self.state / "services").iterdir()}

    def calls(self) -> list[tuple[str, str, int]]:
        """Each call as (verb, its last argument, exit code)."""
        out = []
        for line in self.log.read_text().splitlines():
            rc, verb, *args = line.split("\t")
            out.append((verb, args[-1], int(rc)))
        return out


@pytest.fixture
def launchd(tmp_path, monkeypatch) -> Launchd:
    return Launchd(tmp_path, monkeypatch)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def mac(home: Path) -> units.Host:
    return units.host_for("launchd", home=home, uid=501)


def plist_of(home: Path, label: str) -> str:
    return str(home / "Library" / "LaunchAgents" / f"{label}.plist")


# --- install: bootout, wait until gone, bootstrap (retried while launchd is busy) -------------------


def test_reinstall_waits_for_the_old_instance_before_bootstrapping(home, launchd):
    launchd.set(services=(WORKER,), exit_polls=3)  # the old worker takes 3 polls to checkpoint and exit
    timer = FakeTimer()
    assert service.apply(units.plan("install", mac(home), WorkerSettings()), timer=timer) == 0
    assert [(verb, rc) for verb, _, rc in launchd.calls()] == [
        ("bootout", 0),  # returns at once: the old instance is still exiting
        ("print", 0),
        ("print", 0),
        ("print", 0),
        ("print", 0),
        ("print", 113),  # "Could not find service": gone
        ("enable", 0),
        ("bootstrap", 0),  # first try: nothing raced
    ]
    assert timer.sleeps == [0.5] * 4  # polled, not slept blindly
    assert launchd.services()[WORKER] == plist_of(home, LABEL)


def test_bootstrap_is_retried_on_5_and_37_with_a_growing_delay(home, launchd, capsys):
    launchd.set(bootstrap_errors=(5, 37))
    timer = FakeTimer()
    assert service.apply(units.plan("install", mac(home), WorkerSettings()), timer=timer) == 0
    assert [(verb, rc) for verb, _, rc in launchd.calls() if verb == "bootstrap"] == [
        ("bootstrap", 5),
        ("bootstrap", 37),
        ("bootstrap", 0),
    ]
    assert timer.sleeps == [0.5, 1.0]
    assert "exit code 37: launchd is still busy with it; again in 1 s" in capsys.readouterr().out
    assert WORKER in launchd.services()


def test_bootstrap_retries_are_bounded(home, launchd):
    launchd.set(bootstrap_errors=(5,) * 1000)
    timer = FakeTimer()
    assert service.apply(units.plan("install", mac(home), WorkerSettings()), timer=timer) == 5
    assert sum(timer.sleeps) <= units.BOOTSTRAP_RETRY_S and timer.sleeps[:5] == [0.5, 1, 2, 4, 8]
    assert max(timer.sleeps) == 8
    assert WORKER not in launchd.services()


def test_other_bootstrap_errors_are_not_retried(home, launchd):
    launchd.set(bootstrap_errors=(125,))  # e.g. "Domain does not support specified action"
    timer = FakeTimer()
    assert service.apply(units.plan("install", mac(home), WorkerSettings()), timer=timer) == 125
    assert [verb for verb, _, _ in launchd.calls()].count("bootstrap") == 1 and timer.sleeps == []


def test_the_wait_is_bounded_by_the_longer_of_the_old_and_new_exit_timeout(home):
    installed = Path(plist_of(home, LABEL))
    installed.parent.mkdir(parents=True)
    installed.write_bytes(plistlib.dumps({"Label": LABEL, "ExitTimeOut": 300}))  # the old agent's own rule
    for grace, bound in ((60, 310), (600, 610)):
        steps = units.plan("install", mac(home), WorkerSettings(shutdown_grace=grace))
        waits = [s for s in steps if isinstance(s, units.WaitGone)]
        assert [(w.probe, w.timeout_s) for w in waits] == [(("launchctl", "print", WORKER), bound)]


def test_an_old_instance_that_never_leaves_stops_the_install_at_the_bound(home, launchd, capsys):
    launchd.set(services=(WORKER,), exit_polls=10**9)
    timer = FakeTimer()
    assert service.apply(units.plan("install", mac(home), WorkerSettings(shutdown_grace=5)), timer=timer) == 1
    assert 5 + units.GONE_MARGIN_S <= timer.now <= 5 + units.GONE_MARGIN_S + 0.5
    assert "bootstrap" not in [verb for verb, _, _ in launchd.calls()]
    assert "still finds the service after 15 s" in capsys.readouterr().err


def test_install_with_redis_replaces_both_agents_in_order(home, launchd):
    launchd.set(services=(WORKER, REDIS), exit_polls=1)
    assert service.apply(units.plan("install", mac(home), WorkerSettings(), with_redis=True), timer=FakeTimer()) == 0
    calls = [(verb, target.rsplit("/", 1)[-1]) for verb, target, _ in launchd.calls() if verb != "print"]
    assert calls == [
        ("bootout", LABEL),
        ("bootout", REDIS_LABEL),
        ("enable", REDIS_LABEL),
        ("bootstrap", f"{REDIS_LABEL}.plist"),
        ("enable", LABEL),
        ("bootstrap", f"{LABEL}.plist"),
    ]
    assert set(launchd.services()) == {WORKER, REDIS}


# --- uninstall: the worker has exited before Redis stops -------------------------------------------


def test_uninstall_stops_redis_only_after_the_worker_has_exited(home, launchd):
    for label in (LABEL, REDIS_LABEL):
        Path(plist_of(home, label)).parent.mkdir(parents=True, exist_ok=True)
        Path(plist_of(home, label)).write_bytes(plistlib.dumps({"Label": label}))
    launchd.set(services=(WORKER, REDIS), exit_polls=2)
    assert service.apply(units.plan("uninstall", mac(home), WorkerSettings(), with_redis=True), timer=FakeTimer()) == 0
    calls = launchd.calls()
    worker_gone = calls.index(("print", WORKER, 113))
    redis_bootout = calls.index(("bootout", REDIS, 0))
    assert calls[0] == ("bootout", WORKER, 0) and worker_gone < redis_bootout
    assert launchd.services() == {}
    assert not any(Path(plist_of(home, label)).exists() for label in (LABEL, REDIS_LABEL))


def test_uninstall_leaves_redis_up_while_the_worker_is_still_running(home, launchd):
    launchd.set(services=(WORKER, REDIS), exit_polls=10**9)
    s = WorkerSettings(shutdown_grace=5)
    assert service.apply(units.plan("uninstall", mac(home), s, with_redis=True), timer=FakeTimer()) == 1
    assert ("bootout", REDIS, 0) not in launchd.calls()  # its jobs still need Redis to be requeued
    assert REDIS in launchd.services()


def test_launchd_install_refuses_root(home):
    with pytest.raises(ConfigError, match="gui/0"):
        units.plan("install", units.host_for("launchd", home=home, uid=0), WorkerSettings())
    units.plan("uninstall", units.host_for("launchd", home=home, uid=0), WorkerSettings())  # cleaning up is allowed


# --- privacy protection (TCC) ----------------------------------------------------------------------


def warnings(steps) -> list[str]:
    return [s.text for s in steps if isinstance(s, units.Warn)]


def test_install_warns_about_folders_closed_to_launchd_agents(home, tmp_path):
    (home / "models").mkdir(parents=True)
    (home / "Documents" / "models").mkdir(parents=True)
    (home / "models" / "student").symlink_to(home / "Documents" / "models")  # a link into Documents counts
    s = WorkerSettings(
        teacher=home / "Downloads" / "teacher",
        student=home / "models" / "student",
        adapters_dir=Path("/Volumes/External/adapters"),
        work_dir=home / "kd-work",
    )
    texts = warnings(units.plan("install", mac(home), s))
    assert [t.split(" ", 1)[0] for t in texts] == ["KD_TEACHER", "KD_STUDENT", "KD_ADAPTERS_DIR"]
    assert f"is under {home / 'Downloads'}" in texts[0] and "/Volumes" in texts[2]
    assert all("Operation not permitted" in t and "Full Disk Access" in t for t in texts)


def test_no_warning_for_ordinary_folders_nor_under_systemd(home):
    s = WorkerSettings(teacher=home / "models" / "t", work_dir=home / "kd")
    assert warnings(units.plan("install", mac(home), s)) == []
    s = WorkerSettings(teacher=home / "Documents" / "t")
    assert warnings(units.plan("install", units.host_for("systemd", home=home), s)) == []


def test_warnings_go_to_stderr(home, launchd, capsys):
    launchd.set()
    s = WorkerSettings(work_dir=home / "Desktop" / "kd")
    service.apply(units.plan("install", mac(home), s), timer=FakeTimer())
    err = capsys.readouterr().err
    assert err.startswith("warning: KD_WORK_DIR") and "Desktop" in err


# --- a stable worker name --------------------------------------------------------------------------


def test_macos_name_is_the_local_host_name(launchd, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_LOCAL_HOST_NAME", "Studio-M2")
    monkeypatch.setenv("FAKE_SCUTIL_LOG", str(tmp_path / "scutil.log"))
    assert service.machine_name("darwin") == "Studio-M2"
    assert (tmp_path / "scutil.log").read_text() == "scutil --get LocalHostName\n"


def test_a_mac_without_a_local_host_name_is_a_config_error(launchd):
    with pytest.raises(ConfigError, match="Local Hostname.*KD_WORKER_NAME"):
        service.machine_name("darwin")


def test_linux_name_is_the_machine_id(tmp_path):
    ids = (tmp_path / "etc-machine-id", tmp_path / "dbus-machine-id")
    ids[1].write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    assert service.machine_name("linux", ids) == "3d1219c7c4c5"
    ids[1].unlink()
    with pytest.raises(ConfigError, match="no machine id"):
        service.machine_name("linux", ids)


def test_install_pins_the_name_unless_the_user_set_one(home, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "machine_name", lambda: "Studio-M2")
    pinned = service.pin_worker_name(WorkerSettings())
    env = plistlib.loads(units.render_worker_plist(mac(home), pinned).encode())["EnvironmentVariables"]
    assert env["KD_WORKER_NAME"] == "kd@Studio-M2"
    monkeypatch.setenv("KD_WORKER_NAME", "kd@mine")
    assert service.pin_worker_name(WorkerSettings()).worker_name == "kd@mine"


def test_service_install_carries_the_machine_id_name(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "MACHINE_ID_FILES", ())  # proves the default argument is not what is read
    monkeypatch.setattr(service, "machine_name", lambda: "3d1219c7c4c5")
    out = tmp_path / "out"
    assert service.run_service("install", WorkerSettings(), dry_run=out, manager="systemd") == 0
    assert 'KD_WORKER_NAME="kd@3d1219c7c4c5"' in (out / "kd-worker.env").read_text().splitlines()


# --- status says why the worker stopped ------------------------------------------------------------


def test_launchd_status_prints_why_the_worker_stopped(home, launchd, tmp_path, capsys):
    work = tmp_path / "work"
    runstate.record(work, runstate.CONFIG_ERROR, "KD_TEACHER is not set: point it at a model directory", 0)
    plist = Path(plist_of(home, LABEL))
    plist.parent.mkdir(parents=True)
    plist.write_text(units.render_worker_plist(mac(home), WorkerSettings(work_dir=work)))
    launchd.set(services=(WORKER,))
    assert service.apply(units.plan("status", mac(home), WorkerSettings()), timer=FakeTimer()) == 0
    out = capsys.readouterr().out
    assert "stopped on a configuration error" in out and "KD_TEACHER is not set" in out
    assert f"fix it, then start it: launchctl kickstart {WORKER}" in out


def test_systemd_status_reads_the_work_dir_from_the_env_file(home, tmp_path, monkeypatch, capsys):
    work = tmp_path / "odd $dir"
    runstate.record(work, runstate.STOPPED, "requested stop (SIGTERM/SIGINT) or its jobs done", 0)
    host = units.host_for("systemd", home=home)
    host.env_file.parent.mkdir(parents=True)
    host.env_file.write_text(units.render_env_file(WorkerSettings(work_dir=work)))
    monkeypatch.setattr(service, "_execute", lambda argv, quiet: 3)  # systemctl status: inactive
    assert service.apply(units.plan("status", host, WorkerSettings())) == 3
    out = capsys.readouterr().out
    assert "stopped at" in out and "exit code 0): requested stop" in out and "fix it" not in out


def test_status_without_a_record_says_so(home, launchd, capsys):
    launchd.set()
    assert service.apply(units.plan("status", mac(home), WorkerSettings()), timer=FakeTimer()) == 113
    assert "no record in" in capsys.readouterr().out


def test_env_file_parses_back(tmp_path):
    s = WorkerSettings(redis_url="redis://:p$HOME\"`x`\\y'%z@127.0.0.1:6379/0", work_dir=tmp_path / "a b")
    assert units.parse_env_file(units.render_env_file(s)) == units.service_env(s)


def test_systemd_unit_does_not_restart_a_configuration_error(home):
    unit = units.render_worker_unit(units.host_for("systemd", home=home), WorkerSettings(), False)
    assert "Restart=on-failure\n" in unit and "RestartPreventExitStatus=78\n" in unit
    assert UNIT == "kd-worker.service"
