"""`kd-worker service`: rendered launchd/systemd files, dry runs, and the shipped Redis config run for real."""

from __future__ import annotations

import argparse
import configparser
import os
import plistlib
import shlex
import shutil
import signal
import socket
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from helpers import SHIPPED_REDIS_CONF, free_port, wait_for

from jobs.errors import ConfigError
from kd_worker.ops import service, units
from kd_worker.ops.units import LABEL, REDIS_LABEL, REDIS_UNIT, UNIT, Run, Write
from kd_worker.settings import SHUTDOWN_GRACE_S, WorkerSettings

# Every key of launchd.plist(5) a kd plist may use; a misspelt key (ExitTimeout) is silently ignored by launchd.
LAUNCHD_KEYS = {
    "Label",
    "ProgramArguments",
    "WorkingDirectory",
    "EnvironmentVariables",
    "RunAtLoad",
    "KeepAlive",
    "ThrottleInterval",
    "ExitTimeOut",
    "ProcessType",
    "StandardOutPath",
    "StandardErrorPath",
}


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch):
    """Settings come only from what each test passes (the session may export KD_* or OPENBLAS_*)."""
    for key in list(os.environ):
        if key.startswith("KD_") or key == "OPENBLAS_CORETYPE":
            monkeypatch.delenv(key)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def no_commands(monkeypatch):
    """Any command reaching the one subprocess function fails the test."""

    def refuse(argv, quiet):
        raise AssertionError(f"dry run executed {argv}")

    monkeypatch.setattr(service, "_execute", refuse)


def settings(**kw) -> WorkerSettings:
    return WorkerSettings(**kw)


def mac(home: Path, **kw) -> units.Host:
    """A launchd host of an ordinary user (uid 501; these tests may run as root, which launchd refuses)."""
    return units.host_for("launchd", home=home, uid=501, **kw)


def runs(steps) -> list[tuple[str, ...]]:
    return [s.argv for s in steps if isinstance(s, Run)]


def printed_commands(out: str) -> list[str]:
    return [line.split("$ ", 1)[1] for line in out.splitlines() if line.startswith("[dry-run] $ ")]


# --- launchd ---------------------------------------------------------------------------------------


def test_worker_plist_parses_with_required_keys_and_types(home, tmp_path, no_commands):
    host = mac(home)
    s = settings(redis_url="redis://:s3cret@127.0.0.1:6390/0", shutdown_grace=90, teacher=Path("models/teacher"))
    service.apply(units.plan("install", host, s), dry_run=tmp_path / "out")
    with open(tmp_path / "out" / f"{LABEL}.plist", "rb") as f:
        plist = plistlib.load(f)

    assert set(plist) <= LAUNCHD_KEYS
    assert plist["Label"] == LABEL
    args = plist["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args[1:] == ["run", "--config-error-exit", "0"]  # launchd cannot exempt 78 from KeepAlive
    assert Path(args[0]).name == "kd-worker" and os.access(args[0], os.X_OK)
    assert Path(args[0]).parent == host.kd_worker.parent  # this venv's bin dir
    assert plist["WorkingDirectory"] == str(units.REPO)
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True
    assert type(plist["ThrottleInterval"]) is int and 10 <= plist["ThrottleInterval"] <= 30
    assert type(plist["ExitTimeOut"]) is int and plist["ExitTimeOut"] >= 90
    assert plist["ProcessType"] == "Interactive"
    env = plist["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["PYTHONUNBUFFERED"] == "1" and env["KD_LOG_FORMAT"] == "json"
    assert env["KD_REDIS_URL"] == "redis://:s3cret@127.0.0.1:6390/0"
    assert env["KD_TEACHER"] == str(Path.cwd() / "models" / "teacher")  # absolute: the agent starts elsewhere
    assert env["KD_SHUTDOWN_GRACE"] == "90"
    logs = home / "Library" / "Logs"
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_relative_to(logs)
    assert stat.S_IMODE((tmp_path / "out" / f"{LABEL}.plist").stat().st_mode) == 0o600  # holds the password


def test_plist_values_are_xml_escaped(home):
    url = "redis://:a&b<c>d\"e'f$%@127.0.0.1:6379/0"
    text = units.render_worker_plist(mac(home), settings(redis_url=url))
    assert plistlib.loads(text.encode())["EnvironmentVariables"]["KD_REDIS_URL"] == url


def test_default_grace_reaches_exit_timeout(home):
    text = units.render_worker_plist(mac(home), settings())
    plist = plistlib.loads(text.encode())
    assert plist["ExitTimeOut"] == WorkerSettings().shutdown_grace == SHUTDOWN_GRACE_S
    assert units.render_worker_unit(units.host_for("systemd", home=home), settings(), False).count(
        f"TimeoutStopSec={SHUTDOWN_GRACE_S}\n"
    )
    assert plist["EnvironmentVariables"] == {"KD_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}


def test_launchd_install_dry_run_renders_and_prints_without_running(home, tmp_path, capsys, no_commands):
    host = mac(home)
    out = tmp_path / "out"
    assert service.apply(units.plan("install", host, settings(), with_redis=True), dry_run=out) == 0

    agents, dom = home / "Library" / "LaunchAgents", "gui/501"
    assert printed_commands(capsys.readouterr().out) == [
        f"launchctl bootout {dom}/{LABEL}",
        f"launchctl bootout {dom}/{REDIS_LABEL}",
        f"launchctl enable {dom}/{REDIS_LABEL}",
        f"launchctl bootstrap {dom} {agents}/{REDIS_LABEL}.plist",
        f"launchctl enable {dom}/{LABEL}",
        f"launchctl bootstrap {dom} {agents}/{LABEL}.plist",
    ]
    assert sorted(p.name for p in out.iterdir()) == [f"{REDIS_LABEL}.plist", f"{LABEL}.plist"]
    assert not home.exists()  # nothing outside the dry-run directory was touched
    redis_plist = plistlib.loads((out / f"{REDIS_LABEL}.plist").read_bytes())
    assert redis_plist["ProgramArguments"][1] == str(SHIPPED_REDIS_CONF)
    assert redis_plist["KeepAlive"] is True and set(redis_plist) <= LAUNCHD_KEYS


def test_launchd_uninstall_and_status_dry_run(home, tmp_path, capsys, no_commands):
    host = mac(home)
    dom, plist = "gui/501", home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    service.apply(units.plan("uninstall", host, settings()), dry_run=tmp_path / "u")
    out = capsys.readouterr().out
    assert printed_commands(out) == [f"launchctl bootout {dom}/{LABEL}"]
    assert f"[dry-run] rm -f {plist}" in out.splitlines()
    assert list((tmp_path / "u").iterdir()) == []

    service.apply(units.plan("status", host, settings()), dry_run=tmp_path / "s")
    assert printed_commands(capsys.readouterr().out) == [f"launchctl print {dom}/{LABEL}"]


def test_launchd_has_no_system_mode():
    with pytest.raises(ConfigError, match="LaunchAgent"):
        units.host_for("launchd", system=True)


# --- systemd ---------------------------------------------------------------------------------------


def unit_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def systemd_verify(tmp_path: Path, files: list[Path], user: bool) -> None:
    """`systemd-analyze verify` exits 0 on unknown keys and bad values, only warning: demand silence."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", *map(str, files)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if any(f.name in line or str(f.parent) in line for f in files)
    ]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


def test_user_units_verify_and_carry_the_restart_policy(home, tmp_path, no_commands):
    host = units.host_for("systemd", home=home)
    out = tmp_path / "out"
    service.apply(units.plan("install", host, settings(shutdown_grace=120), with_redis=True), dry_run=out)

    unit = unit_sections((out / UNIT).read_text())
    svc = unit["Service"]
    assert svc["Restart"] == "on-failure" and svc["RestartPreventExitStatus"] == "78"
    assert svc["KillMode"] == "mixed" and svc["TimeoutStopSec"] == "120"
    assert 10 <= int(svc["RestartSec"]) <= 30
    assert shlex.split(svc["ExecStart"]) == [str(host.kd_worker), "run"]
    assert svc["WorkingDirectory"] == str(units.REPO) and svc["EnvironmentFile"] == str(host.env_file)
    assert unit["Unit"]["After"] == REDIS_UNIT and unit["Unit"]["Wants"] == REDIS_UNIT
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit["Install"]["WantedBy"] == "default.target" and "User" not in svc
    assert unit_sections((out / REDIS_UNIT).read_text())["Service"]["Type"] == "notify"
    assert stat.S_IMODE((out / "kd-worker.env").stat().st_mode) == 0o600
    if shutil.which("systemd-analyze"):
        systemd_verify(tmp_path, [out / UNIT, out / REDIS_UNIT], user=True)


def test_system_unit_verifies_orders_after_redis_and_drops_root(home, tmp_path, no_commands):
    host = units.host_for("systemd", system=True, home=home)
    out = tmp_path / "out"
    service.apply(units.plan("install", host, settings()), dry_run=out)
    unit = unit_sections((out / UNIT).read_text())
    assert unit["Unit"]["After"] == "redis-server.service" and unit["Unit"]["Wants"] == "redis-server.service"
    assert unit["Service"]["User"] == units.REPO.owner()  # the owner of the checkout and its venv
    assert unit["Service"]["EnvironmentFile"] == "/etc/kd-daemon/kd-worker.env"
    assert unit["Service"]["TimeoutStopSec"] == str(SHUTDOWN_GRACE_S)
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        systemd_verify(tmp_path, [out / UNIT], user=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt package systemd)")
def test_exec_start_quoting_survives_unusual_paths(tmp_path, home):
    # systemd-analyze checks the ExecStart binary is executable: it only finds it if the quoting is right.
    odd = tmp_path / "kd daemon %h $HOME" / "bin"
    odd.mkdir(parents=True)
    exe = odd / "kd-worker"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    host = units.host_for("systemd", kd_worker=exe, home=home)
    unit = tmp_path / UNIT
    unit.write_text(units.render_worker_unit(host, settings(), with_redis=False))
    systemd_verify(tmp_path, [unit], user=True)


def test_env_file_reads_back_exactly(tmp_path):
    # systemd documents POSIX-shell double-quote rules for EnvironmentFile values; sh reads it back.
    s = settings(
        redis_url="redis://:p$HOME\"`x`\\y'%z@127.0.0.1:6379/0", kd_defaults={"temperature": 2.0}, cache_student=False
    )
    env_file = tmp_path / "kd.env"
    env_file.write_text(units.render_env_file(s))
    expected = units.service_env(s)
    script = '. "$1"; ' + " ".join(f'printf "%s\\0" "${k}";' for k in expected)
    got = subprocess.run(["sh", "-c", script, "sh", str(env_file)], capture_output=True, check=True, env={}).stdout
    assert dict(zip(expected, got.decode().split("\0")[:-1], strict=True)) == expected


def test_service_env_round_trips_through_settings(monkeypatch):
    s = settings(
        redis_url="unix:///tmp/r.sock?password=x",
        queue="kd-test",
        adapters_dir=Path("out/adapters"),
        kd_defaults={"alpha": 0.5},
        cache_student=False,
        shutdown_grace=45,
        openblas_coretype="Haswell",
    )
    env = units.service_env(s)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    back = WorkerSettings()
    for name in s.model_fields_set:
        expected = getattr(s, name)
        assert getattr(back, name) == (expected.absolute() if isinstance(expected, Path) else expected), name


def test_systemd_dry_runs_print_the_commands(home, tmp_path, capsys, no_commands):
    user = units.host_for("systemd", home=home)
    service.apply(units.plan("install", user, settings()), dry_run=tmp_path / "i")
    assert printed_commands(capsys.readouterr().out) == [
        "systemctl --user daemon-reload",
        f"systemctl --user enable {UNIT}",
        f"systemctl --user restart {UNIT}",
    ]
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["kd-worker.env", UNIT]

    service.apply(units.plan("uninstall", user, settings(), with_redis=True), dry_run=tmp_path / "u")
    out = capsys.readouterr().out
    assert printed_commands(out) == [
        f"systemctl --user disable --now {UNIT}",
        f"systemctl --user disable --now {REDIS_UNIT}",
        "systemctl --user daemon-reload",
    ]
    assert f"[dry-run] rm -f {user.env_file}" in out.splitlines()

    system = units.host_for("systemd", system=True, home=home)
    service.apply(units.plan("status", system, settings()), dry_run=tmp_path / "s")
    assert printed_commands(capsys.readouterr().out) == [f"systemctl status --no-pager {UNIT}"]
    assert not home.exists()


def test_system_units_refuse_the_user_level_redis(home):
    with pytest.raises(ConfigError, match="redis-server.service"):
        units.plan("install", units.host_for("systemd", system=True, home=home), settings(), with_redis=True)


# --- the real (non-dry) path, with the one subprocess function replaced ----------------------------


def test_install_writes_real_paths_and_runs_the_planned_commands(home, monkeypatch):
    calls = []
    monkeypatch.setattr(service, "_execute", lambda argv, quiet: calls.append(argv) or 0)
    host = units.host_for("systemd", home=home)
    steps = units.plan("install", host, settings(redis_url="redis://:pw@127.0.0.1:6379/0"), with_redis=True)
    assert service.apply(steps) == 0
    assert calls == runs(steps)
    assert (host.unit_dir / UNIT).is_file() and (host.unit_dir / REDIS_UNIT).is_file()
    assert host.redis_data.is_dir()
    assert stat.S_IMODE(host.env_file.stat().st_mode) == 0o600
    assert 'KD_REDIS_URL="redis://:pw@127.0.0.1:6379/0"' in host.env_file.read_text().splitlines()

    calls.clear()
    steps = units.plan("uninstall", host, settings(), with_redis=True)
    assert service.apply(steps) == 0 and calls == runs(steps)
    assert not (host.unit_dir / UNIT).exists() and not host.env_file.exists()
    assert host.redis_data.is_dir()  # queued jobs are data: uninstall keeps them


def test_status_reports_every_agent_and_a_failing_print(home, monkeypatch):
    calls = []
    monkeypatch.setattr(service, "_execute", lambda argv, quiet: calls.append(argv) or 0)
    assert service.apply(units.plan("status", mac(home), settings(), with_redis=True)) == 0
    calls.clear()
    monkeypatch.setattr(service, "_execute", lambda argv, quiet: calls.append(argv) or 113)  # not found
    assert service.apply(units.plan("status", mac(home), settings(), with_redis=True)) == 113
    assert len(calls) == 2  # status reports every agent


def test_missing_service_manager_is_a_config_error():
    with pytest.raises(ConfigError, match="kd-no-such-tool not found"):
        service.apply([Run(("kd-no-such-tool", "--version"))])


def test_missing_templates_or_executable_are_config_errors(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        units.host_for("systemd", kd_worker=tmp_path / "kd-worker")
    monkeypatch.setattr(units, "TEMPLATES", tmp_path / "gone")
    with pytest.raises(ConfigError, match="templates not found"):
        units.host_for("systemd")


def test_a_template_that_breaks_the_plist_fails_at_render(monkeypatch, tmp_path, home):
    broken = tmp_path / "templates"
    shutil.copytree(units.TEMPLATES, broken)
    plist = broken / f"{LABEL}.plist.in"
    plist.write_text(plist.read_text().replace("<true/>", "<true>", 1))
    monkeypatch.setattr(units, "TEMPLATES", broken)
    with pytest.raises(ConfigError, match="not a valid property list"):
        units.render_worker_plist(mac(home), settings())


def test_cli_wiring_runs_a_dry_run(tmp_path, capsys, no_commands):
    parser = argparse.ArgumentParser(prog="kd-worker")
    service.add_service_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["service", "install", "--dry-run", str(tmp_path / "o"), "--manager", "systemd", "--system"]
    )
    assert args.func(args, settings(), None) == 0
    assert (tmp_path / "o" / UNIT).is_file()
    assert "[dry-run] $ systemctl enable kd-worker.service" in capsys.readouterr().out.splitlines()


def test_write_is_atomic_and_keeps_its_mode(tmp_path):
    target = tmp_path / "a" / "f.env"
    service.apply([Write(target, "A=1\n", 0o600)])
    service.apply([Write(target, "A=2\n", 0o600)])
    assert target.read_text() == "A=2\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["f.env"]


# --- Redis: the shipped config, started for real ---------------------------------------------------


def conf_directives(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip()
    return out


def test_redis_conf_has_the_queue_directives():
    conf = conf_directives(SHIPPED_REDIS_CONF)
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["protected-mode"] == "yes"
    assert conf["bind"] == "127.0.0.1"
    assert not {"dir", "port", "daemonize", "logfile"} & set(conf)  # left to the caller so the file composes


@contextmanager
def redis_process(argv: list[str], port: int, env: dict[str, str] | None = None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {proc.returncode}: {shlex.join(argv)}")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_for(up, timeout=20, what=f"redis-server on {port}")
        yield proc, client
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)


def assert_queue_config(client: redis.Redis) -> None:
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert client.config_get("bind")["bind"] == "127.0.0.1"


def test_rendered_redis_unit_starts_and_tells_systemd_it_is_ready(home, tmp_path):
    host = units.host_for("systemd", home=home)
    unit = unit_sections(units.render_redis_unit(host))
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[:2] == [str(host.redis_server), str(SHIPPED_REDIS_CONF)]
    host.redis_data.mkdir(parents=True)  # install's MakeDir step
    port = free_port()
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(20)
        with redis_process(argv + ["--port", str(port)], port, env={"NOTIFY_SOCKET": str(notify)}) as (_, client):
            messages = []
            wait_for(
                lambda: messages.append(sock.recv(4096).decode()) or any("READY=1" in m for m in messages),
                timeout=20,
                what="READY=1 from redis-server (Type=notify)",
            )
            assert_queue_config(client)
            assert client.config_get("dir")["dir"] == str(host.redis_data)


def test_rendered_redis_plist_program_starts(home):
    host = mac(home)
    plist = plistlib.loads(units.render_redis_plist(host).encode())
    host.redis_data.mkdir(parents=True)
    port = free_port()
    with redis_process(plist["ProgramArguments"] + ["--port", str(port)], port) as (_, client):
        assert_queue_config(client)
        assert client.config_get("dir")["dir"] == plist["WorkingDirectory"] == str(host.redis_data)


def test_queued_job_survives_sigkill_with_the_shipped_config(tmp_path):
    from rq import Queue
    from rq.job import Job

    from jobs.models import TASK_FUNC

    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    argv = [shutil.which("redis-server"), str(SHIPPED_REDIS_CONF), "--port", str(port), "--dir", str(data)]
    with redis_process(argv, port) as (proc, client):
        job = Queue("kd", connection=client, serializer="json").enqueue(TASK_FUNC, {"domain": "memory"})
        # The write is in the AOF file (the OS page cache) once redis-server has written it; SIGKILL
        # cannot lose it from there, only a power cut before the next everysec fsync could.
        aof = lambda: any(job.id.encode() in p.read_bytes() for p in data.rglob("*.aof"))  # noqa: E731
        wait_for(aof, timeout=10, what="the job in the append-only file")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with redis_process(argv, port) as (_, client):
        queue = Queue("kd", connection=client, serializer="json")
        assert queue.job_ids == [job.id]
        assert Job.fetch(job.id, connection=client, serializer="json").func_name == TASK_FUNC


def test_redis_conf_overrides_a_config_that_includes_it(tmp_path):
    # README: Homebrew's and Debian's configs end with `include .../redis.conf`; the later lines win.
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    parent = tmp_path / "parent.conf"
    parent.write_text(
        f"port {port}\ndir {data}\nappendonly no\nappendfsync always\n"
        f"maxmemory-policy allkeys-lru\nprotected-mode no\ninclude {SHIPPED_REDIS_CONF}\n"
    )
    with redis_process([shutil.which("redis-server"), str(parent)], port) as (_, client):
        assert_queue_config(client)
        assert client.config_get("dir")["dir"] == str(data)
