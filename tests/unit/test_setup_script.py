"""scripts/setup.sh's decisions on a Mac, run on Linux with recorded fakes of uname, sw_vers, sysctl and brew
(tests/fakes/) first on PATH: `--check` decides the platform and the Python and changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

FAKES = REPO / "tests" / "fakes"


class Mac:
    """A fake Mac: its tools on PATH, Homebrew at `prefix` (off PATH, like a shell that never ran brew shellenv)."""

    def __init__(self, tmp_path: Path):
        self.bin, self.prefix = tmp_path / "bin", tmp_path / "homebrew"
        self.bin.mkdir()
        (self.prefix / "bin").mkdir(parents=True)
        for tool in ("uname", "sw_vers", "sysctl"):
            (self.bin / tool).symlink_to(FAKES / tool)
        (self.prefix / "bin" / "brew").symlink_to(FAKES / "brew")
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "KD_HOMEBREW_PREFIX": str(self.prefix),
            "FAKE_UNAME_S": "Darwin",
            "FAKE_UNAME_M": "arm64",
            "FAKE_MACOS_VERSION": "14.5",
            "FAKE_PROC_TRANSLATED": "0",
        }

    def python(self, where: Path, name: str, reports: str) -> Path:
        """A python that answers setup.sh's probe ("3.12 arm64")."""
        exe = where / name
        exe.write_text(f'#!/bin/sh\necho "{reports}"\n')
        exe.chmod(0o755)
        return exe

    def check(self, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(REPO / "scripts" / "setup.sh"), "--check"],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def mac(tmp_path) -> Mac:
    return Mac(tmp_path)


def test_homebrew_python_is_found_with_brew_off_path(mac):
    mac.python(mac.prefix / "bin", "python3.11", "3.11 arm64")
    py = mac.python(mac.prefix / "bin", "python3.12", "3.12 arm64")
    mac.python(mac.bin, "python3", "3.9 arm64")  # the stock python3 of macOS
    out = mac.check()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(f"ok: Darwin arm64, python {py}")


def test_the_newest_supported_homebrew_python_wins(mac):
    for v in ("3.11", "3.12", "3.13"):
        mac.python(mac.prefix / "bin", f"python{v}", f"{v} arm64")
    assert mac.check().stdout.strip().endswith(f"python {mac.prefix}/bin/python3.13")


def test_kd_python_overrides(mac):
    mac.python(mac.prefix / "bin", "python3.13", "3.13 arm64")
    mine = mac.python(mac.bin, "mypython", "3.11 arm64")
    assert mac.check(KD_PYTHON=str(mine)).stdout.strip().endswith(f"python {mine}")


@pytest.mark.parametrize(
    "env, cause",
    [
        ({"FAKE_PROC_TRANSLATED": "1", "FAKE_UNAME_M": "x86_64"}, "this shell runs under Rosetta 2"),
        ({"FAKE_PROC_TRANSLATED": "", "FAKE_UNAME_M": "x86_64"}, "this Mac is x86_64: MLX needs Apple silicon"),
        ({"FAKE_MACOS_VERSION": "13.6.1"}, "macOS 13.6.1: MLX needs macOS 14"),
        ({"FAKE_MACOS_VERSION": "10.15.7"}, "macOS 10.15.7: MLX needs macOS 14"),
    ],
)
def test_what_mlx_has_no_wheel_for_is_refused_naming_the_cause(mac, env, cause):
    mac.python(mac.prefix / "bin", "python3.12", "3.12 arm64")
    out = mac.check(**env)
    assert out.returncode == 1 and f"cannot set up here: {cause}" in out.stdout


def test_only_the_stock_python_is_refused_with_the_fix(mac):
    mac.python(mac.bin, "python3", "3.9 arm64")
    out = mac.check()
    assert out.returncode == 1
    assert "python3 is Python 3.9; Python >= 3.11 is required: brew install python@3.12" in out.stdout


def test_an_intel_homebrew_python_is_refused(mac):
    mac.python(mac.prefix / "bin", "python3.12", "3.12 x86_64")
    out = mac.check()
    assert out.returncode == 1 and "is an x86_64 build" in out.stdout and "native arm64 Python" in out.stdout


def test_macos_14_and_later_pass(mac):
    mac.python(mac.prefix / "bin", "python3.12", "3.12 arm64")
    for version in ("14.0", "15.3", "26.1"):
        assert mac.check(FAKE_MACOS_VERSION=version).returncode == 0, version


def test_linux_keeps_using_python3(mac):
    out = mac.check(FAKE_UNAME_S="Linux", FAKE_UNAME_M="x86_64", PATH=f"{mac.bin}:{os.environ['PATH']}")
    assert out.returncode == 0 and "ok: Linux x86_64, python python3" in out.stdout
