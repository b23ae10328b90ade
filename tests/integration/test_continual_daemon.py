"""The continual loop through real `kd-worker run` processes on one redis-server: two workers (two
Macs) publishing one domain in turn share one corpus; a forgetting job is kept out by the
regression gate and `kd-client status`/`summary` say why; `kd-client data rebuild` retrains the
domain from its corpus as one job through the normal submit path."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import connect, kd_client, wait_status

from jobs import publisher
from jobs.config import resolve_config
from kd_client import queue as Q
from kd_client.corpus import Corpus, CorpusLimits
from kd_worker.engine.data import load_examples, split_examples

PHRASINGS = ("What is {n}'s favourite colour?", "Which colour does {n} like?", "Tell me {n}'s colour.", "{n}: colour?")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey")
GATED = ["--set", "alpha=1.0", "--set", "learning_rate=1e-3", "--set", "iterations=40", "--set", "val_fraction=0.25"]


def facts(tmp: Path, tag: str, n: int = 8) -> Path:
    rows = [
        {"prompt": p.format(n=f"{tag}{i}"), "response": f"{tag}{i}'s favourite colour is {COLOURS[(i * 5) % 11]}."}
        for i in range(n)
        for p in PHRASINGS
    ]
    path = tmp / f"{tag}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split(path: Path) -> tuple[set[str], set[str]]:
    """The keys of the (training, held-out) split the engine makes of `path` under GATED."""
    cfg = resolve_config({"val_fraction": 0.25})
    train, val = split_examples(load_examples((("corrections", path),), 10_000), cfg.val_fraction, cfg.seed)
    return {e.key for e in train}, {e.key for e in val}


def submit(env, path: Path, *extra: str) -> str:
    out = kd_client(env, "submit", "--domain", "memory", "--corrections", str(path), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def test_two_workers_share_one_corpus_and_the_gate_keeps_forgetting_out(env, worker, tmp_path):
    env = dict(env, KD_GATE_REGRESSION_SLACK="0")  # the fixture teacher's KLs are below the default slack
    conn, adapters = connect(env), Path(env["KD_ADAPTERS_DIR"])
    corpus = Corpus(conn, "memory", CorpusLimits(10_000, 10**8, 256))
    first = worker(name="kd-mac-1", base=env)
    data = {tag: facts(tmp_path, tag) for tag in ("ada", "bob", "cy")}
    splits = {tag: split(path) for tag, path in data.items()}
    a = submit(env, data["ada"], *GATED)
    assert wait_status(conn, a, {"finished"})["outcome"]["published"]

    # a fresh LoRA on new facts alone forgets: the regression gate keeps it out, and says so
    b = submit(env, data["bob"], *GATED, "--set", "replay=0", "--set", "init=base")
    st = wait_status(conn, b, {"finished"})
    assert not st["outcome"]["published"] and st["outcome"]["gate"]["reason"].startswith("forgets earlier jobs")
    status = kd_client(env, "status", b)
    assert status.returncode == 3 and "gate=forgets earlier jobs" in status.stdout
    assert "last rejected: job " + b in kd_client(env, "summary").stdout
    first.stop()

    # another machine: its own disk, the same Redis; it replays what the first one recorded
    second = worker(name="kd-mac-2", base=env, KD_WORK_DIR=str(tmp_path / "work-mac-2"))
    c = submit(env, data["cy"], *GATED)  # the defaults: replay and warm start
    outcome = wait_status(conn, c, {"finished"})["outcome"]
    assert outcome["published"] and outcome["version"] == 2, json.dumps(outcome["gate"])
    m = json.loads((Path(outcome["adapter_path"]) / publisher.METRICS).read_text())
    (train_a, val_a), (train_b, val_b), (train_c, _) = splits.values()
    assert set(m["continual"]["replay"]["keys"]) == train_a | train_b  # b was rejected: still data
    assert m["continual"]["init"]["used"] == "current" and m["gate"]["regression"]["examples"] == len(val_a | val_b)
    recs = corpus.records()
    assert len(recs) == 96 and {r.provenance[0].job_id for r in recs} == {a, b, c}
    assert second.events("corpus_recorded")[0]["added"] == 32
    assert publisher.resolve(adapters, "memory").number == 2

    # rebuild: the corpus's training examples as one job, from the base, without replay
    members = len(corpus.training_members())
    out = kd_client(env, "data", "--domain", "memory", "rebuild", "--set", "iterations=4", "--json")
    assert out.returncode == 0, out.stderr
    receipt = json.loads(out.stdout)
    assert receipt["examples"] == members == len(train_a | train_b | train_c)  # held-out splits kept out
    wait_status(conn, receipt["job_id"], {"finished"})
    payload = Q.fetch(conn, receipt["job_id"]).kwargs["payload"]
    assert payload["overrides"] == {"iterations": 4, "replay": 0.0, "init": "base"}
    assert payload["submitter"] == "kd-client rebuild"
    plan = second.events("continual_plan")[-1]
    assert (plan["replay"], plan["init"]) == (0, "base")
    assert second.events("corpus_recorded")[-1] | {"added": 0} == second.events("corpus_recorded")[-1]
    stats = json.loads(kd_client(env, "data", "--domain", "memory", "stats", "--json").stdout)
    assert (stats["examples"], stats["jobs"], stats["regression"]) == (96, 4, stats["held_out"])
