"""Exact resume across a process kill: `kd-worker distill` SIGKILLed between two checkpoints and
rerun in a fresh process ends bit for bit where an uninterrupted run of the same job ends (every
adapter tensor, every logged loss), with LoRA dropout on so the per-step random state is part of
what must replay."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
from helpers import SAMPLES, distill, engine_settings, kd_env, venv_bin, wait_for

# save_every=5 of 15 steps: the kill lands after the first checkpoint, steps before the next
SETTINGS = {
    "iterations": 15,
    "save_every": 5,
    "val_every": 15,
    "gen_max_tokens": 12,
    "batch_size": 2,
    "lora_dropout": 0.1,
}


def distill_cmd(prompts: Path, out: Path) -> list[str]:
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    return [venv_bin("kd-worker"), "distill", "--domain", "memory", "--prompts", str(prompts), *sets, "--out", str(out)]


def prompts_file(tmp: Path) -> Path:
    """Six of the bundled prompts: a short teacher phase."""
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join((SAMPLES / "memory.jsonl").read_text().splitlines(keepends=True)[:6]))
    return prompts


def start(tmp: Path, name: str, models_root: Path) -> subprocess.Popen:
    """`kd-worker distill --json` with its own work dir; the run id hashes the inputs, so a rerun
    of the same command in the same work dir is the same run."""
    env = kd_env(
        KD_WORK_DIR=str(tmp / name / "work"),
        KD_TEACHER=str(models_root / "teacher"),
        KD_STUDENT=str(models_root / "student"),
    )
    prompts = prompts_file(tmp)
    with open(tmp / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*distill_cmd(prompts, tmp / name / "out"), "--json"], env=env, stdout=subprocess.DEVNULL, stderr=log
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


def kill_at_first_checkpoint(proc: subprocess.Popen, work: Path) -> None:
    try:
        wait_for(lambda: checkpoints(work) or proc.poll() is not None, 240, 0.005, "the first checkpoint")
    finally:
        proc.kill()  # SIGKILL


def test_a_run_killed_between_checkpoints_resumes_bit_exact_in_a_fresh_process(tmp_path, models_root):
    victim = start(tmp_path, "victim", models_root)
    work = tmp_path / "victim" / "work"
    killer = threading.Thread(target=kill_at_first_checkpoint, args=(victim, work))
    killer.start()
    # meanwhile, on this thread: the same job uninterrupted, in-process (what `kd-worker distill` runs)
    # in another work dir; the resumed CLI run must match it bit for bit
    data = (("prompts", prompts_file(tmp_path)),)
    distill(
        tmp_path / "reference",
        models_root,
        data=data,
        overrides=SETTINGS,
        settings=engine_settings(tmp_path / "reference"),
    )
    killer.join(240)
    assert victim.wait(30) == -signal.SIGKILL, (tmp_path / "victim.log").read_text()[-3000:]
    kept = checkpoints(work)
    assert kept and kept[-1] < f"step_{SETTINGS['iterations']:07d}", kept  # killed before the last step
    assert not (tmp_path / "victim" / "out").exists()  # nothing published by the killed run

    resumed = start(tmp_path, "victim", models_root)  # the same command again, a fresh process
    assert resumed.wait(240) == 0, (tmp_path / "victim.log").read_text()[-3000:]

    (ev,) = events(tmp_path / "victim.log", "training_resumed")
    assert ev["step"] == int(kept[-1][5:])  # it resumed from the checkpoint the kill left
    want, want_metrics = published(tmp_path / "reference" / "adapters_kd")
    got, got_metrics = published(tmp_path / "victim" / "out")
    assert got_metrics["timing"]["resumed_from"] == ev["step"]
    assert got.keys() == want.keys()
    assert {k.split("/")[0] for k in want} == {"0001", "checkpoint_5", "checkpoint_10", "checkpoint_15"}
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} adapter tensors differ after resuming at {ev['step']}: {differ[:5]}"
    assert len(got_metrics["train"]) == SETTINGS["iterations"]
    assert got_metrics["train"] == want_metrics["train"]  # every logged loss, exactly
    assert got_metrics["val"] == want_metrics["val"] and got_metrics["after"] == want_metrics["after"]
