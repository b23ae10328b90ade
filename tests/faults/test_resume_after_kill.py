"""Exact resume across a process kill: `kd-worker distill` SIGKILLed between two checkpoints and
rerun in a fresh process ends bit for bit where an uninterrupted run ends (every adapter tensor,
every logged loss), with LoRA dropout on so the per-step random state is part of what must replay."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from helpers import SAMPLES, kd_env, venv_bin, wait_for

# save_every=8 of 24 steps: the kill lands after the first checkpoint, several steps before the next
SETTINGS = {
    "iterations": 24,
    "save_every": 8,
    "val_every": 12,
    "gen_max_tokens": 16,
    "batch_size": 4,
    "lora_dropout": 0.1,
}


def distill_cmd(out: Path) -> list[str]:
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    prompts = str(SAMPLES / "memory.jsonl")
    return [venv_bin("kd-worker"), "distill", "--domain", "memory", "--prompts", prompts, *sets, "--out", str(out)]


def start(tmp: Path, name: str, models_root: Path) -> subprocess.Popen:
    """`kd-worker distill --json` with its own work dir; the run id hashes the inputs, so a rerun
    of the same command in the same work dir is the same run."""
    env = kd_env(
        KD_WORK_DIR=str(tmp / name / "work"),
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
    )
    with open(tmp / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*distill_cmd(tmp / name / "out"), "--json"], env=env, stdout=subprocess.DEVNULL, stderr=log
        )


def checkpoints(work: Path) -> list[str]:
    return sorted(p.name for p in work.glob("runs/*/checkpoints/step_*") if (p / "state.json").is_file())


def events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name:
            out.append(ev)
    return out


def published(out: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every adapter tensor of the version (final weights and each checkpoint_N) and its metrics."""
    version = out / "memory" / "versions" / "0001"
    tensors = {
        f"{f.parent.name}/{k}": np.array(v)
        for f in sorted(version.rglob("adapters.safetensors"))
        for k, v in mx.load(str(f)).items()
    }
    return tensors, json.loads((version / "kd_metrics.json").read_text())


def test_a_run_killed_between_checkpoints_resumes_bit_exact_in_a_fresh_process(tmp_path, models_root):
    reference = start(tmp_path, "reference", models_root)  # uninterrupted, its own work dir
    victim = start(tmp_path, "victim", models_root)
    work = tmp_path / "victim" / "work"
    try:
        wait_for(lambda: checkpoints(work) or victim.poll() is not None, 240, 0.005, "the first checkpoint")
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(30) == -signal.SIGKILL
    finally:
        victim.kill()
    kept = checkpoints(work)
    assert kept and kept[-1] < f"step_{SETTINGS['iterations']:07d}", kept  # killed before the last step
    assert not (tmp_path / "victim" / "out").exists()  # nothing published by the killed run

    resumed = start(tmp_path, "victim", models_root)  # the same command again, a fresh process
    assert resumed.wait(240) == 0, (tmp_path / "victim.log").read_text()[-3000:]
    assert reference.wait(240) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    (ev,) = events(tmp_path / "victim.log", "training_resumed")
    assert ev["step"] == int(kept[-1][5:])  # it resumed from the checkpoint the kill left
    want, want_metrics = published(tmp_path / "reference" / "out")
    got, got_metrics = published(tmp_path / "victim" / "out")
    assert got_metrics["timing"]["resumed_from"] == ev["step"]
    assert got.keys() == want.keys() and len(want) > 4
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} adapter tensors differ after resuming at {ev['step']}: {differ[:5]}"
    assert len(got_metrics["train"]) == SETTINGS["iterations"]
    assert got_metrics["train"] == want_metrics["train"]  # every logged loss, exactly
    assert got_metrics["val"] == want_metrics["val"] and got_metrics["after"] == want_metrics["after"]
