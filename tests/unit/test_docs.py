"""The README's configuration reference and command help stay true to the code."""

from __future__ import annotations

import re

from helpers import REPO

from kd_client.cli import build_parser as client_parser
from kd_client.settings import ClientSettings
from kd_worker.cli import build_parser as worker_parser
from kd_worker.settings import WorkerSettings

README = (REPO / "README.md").read_text()


def test_every_setting_is_documented_and_nothing_else():
    fields = set(WorkerSettings.model_fields) | set(ClientSettings.model_fields)
    documented = set(re.findall(r"^\| `KD_([A-Z_0-9]+)`", README, flags=re.M))
    assert documented == {f.upper() for f in fields}


def test_documented_commands_exist():
    worker = set(worker_parser()._subparsers._group_actions[0].choices)
    client = set(client_parser()._subparsers._group_actions[0].choices)
    for cmd in re.findall(r"kd-worker ([a-z-]+)", README):
        assert cmd in worker, cmd
    for cmd in re.findall(r"kd-client ([a-z-]+)", README):
        assert cmd in client, cmd
