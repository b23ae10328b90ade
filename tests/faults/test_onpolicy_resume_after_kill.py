"""Exact resume of an *on-policy* run across a process kill (issue 16): `kd-worker distill` with
on_policy=1.0 SIGKILLed between two checkpoints and rerun in a fresh process ends bit for bit where
an uninterrupted run ends. A rollout window (rollout_every=3) spans the first checkpoint (step 5 is
the last step of the window sampled at step 3), so the resumed run must train on the rollout
buffer the checkpoint saved, not on one sampled from the weights at step 5. Reuses the off-policy
kill test's helpers."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
from helpers import distill, engine_settings, kd_env, venv_bin
from test_resume_after_kill import checkpoints, events, kill_at_first_checkpoint, prompts_file, published

SETTINGS = {
    "iterations": 12,
    "save_every": 5,
    "val_every": 12,
    "gen_max_tokens": 12,
    "batch_size": 2,
    "lora_dropout": 0.1,
    "on_policy": 1.0,
    "rollout_every": 3,
    "rollout_batch": 3,
}
TIMING = ("rollout_s", "score_s")


def start(tmp: Path, name: str, models_root: Path) -> subprocess.Popen:
    env = kd_env(
        KD_WORK_DIR=str(tmp / name / "work"),
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
    )
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    cmd = [venv_bin("kd-worker"), "distill", "--domain", "memory", "--prompts", str(prompts_file(tmp)), *sets]
    with open(tmp / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [*cmd, "--out", str(tmp / name / "out"), "--json"], env=env, stdout=subprocess.DEVNULL, stderr=log
        )


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_an_on_policy_run_killed_between_checkpoints_resumes_bit_exact(tmp_path, models_root):
    victim = start(tmp_path, "victim", models_root)
    work = tmp_path / "victim" / "work"
    killer = threading.Thread(target=kill_at_first_checkpoint, args=(victim, work))
    killer.start()
    data = (("prompts", prompts_file(tmp_path)),)
    settings = engine_settings(tmp_path / "reference")
    distill(tmp_path / "reference", models_root, data=data, overrides=SETTINGS, settings=settings)
    killer.join(240)
    assert victim.wait(30) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    kept = checkpoints(work)
    assert kept and kept[-1] < f"step_{SETTINGS['iterations']:07d}", kept

    resumed = start(tmp_path, "victim", models_root)
    assert resumed.wait(300) == 0, (tmp_path / "victim.log").read_text()[-3000:]
    (ev,) = events(tmp_path / "victim.log", "training_resumed")
    assert ev["step"] == int(kept[-1][5:])
    want, want_metrics = published(tmp_path / "reference" / "adapters_kd")
    got, got_metrics = published(tmp_path / "victim" / "out")
    assert got.keys() == want.keys()
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} adapter tensors differ after resuming at {ev['step']}: {differ[:5]}"
    rows = got_metrics["train"]
    assert len(rows) == SETTINGS["iterations"] and all(r["on_policy"] == 1.0 for r in rows)
    assert untimed(rows) == untimed(want_metrics["train"])  # every loss and on-policy KL, exactly
    # the resumed process sampled no rollout for the window the checkpoint was taken in
    assert rows[ev["step"]]["rollout"] == float(ev["step"] % SETTINGS["rollout_every"] == 0)
