"""The daemon end to end: real redis-server, real `kd-worker run` processes, real tiny models."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from helpers import SAMPLES, connect, kd_client, row, wait_for, wait_phase, wait_status
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from jobs.models import blob_key, health_key

LONG = ["--set", "iterations=5000", "--set", "save_every=5", "--set", "val_every=100000"]


def submit(env, domain: str, *extra: str) -> str:
    out = kd_client(env, "submit", "--domain", domain, "--prompts", str(SAMPLES / f"{domain}.jsonl"), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0]


def test_cli_submit_to_published_adapter_with_teacher_loaded_once(env, worker):
    w = worker()
    conn = connect(env)
    ids = [submit(env, d) for d in ("memory", "debug", "task")]
    out = kd_client(env, "watch", ids[-1])
    assert out.returncode == 0, out.stderr
    for job_id in ids:
        st = wait_status(conn, job_id, {"finished"})
        assert st["outcome"]["published"] and Path(st["outcome"]["adapter_path"]).is_dir()
    cli = json.loads(kd_client(env, "status", ids[-1], "--json").stdout)  # the CLI prints that same row
    assert cli == json.loads(json.dumps(st, default=str))
    teacher_loads = [e for e in w.events("model_loaded") if e["path"].endswith("/teacher")]
    assert len(teacher_loads) == 1  # resident across the three jobs
    assert len(w.events("job_finished")) == 3
    summary = json.loads(kd_client(env, "summary", "--json").stdout)
    assert set(summary["domains"]) == {"memory", "debug", "task"}
    dup = kd_client(env, "submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl"))
    assert dup.stdout.split()[0] == ids[0] and "duplicate" in dup.stdout


def test_cancel_running_and_queued_jobs(env, worker):
    worker()
    conn = connect(env)
    running = submit(env, "memory", *LONG)
    queued = submit(env, "debug", *LONG)
    wait_phase(conn, running, "train", min_step=1)
    assert "canceled" in kd_client(env, "cancel", queued).stdout
    assert "stopping" in kd_client(env, "cancel", running).stdout
    assert wait_status(conn, running, {"stopped"}, timeout=30)["status"] == "stopped"
    st = wait_status(conn, queued, {"canceled"})
    assert st["started_at"] is None
    after = submit(env, "task")  # the worker lives on
    assert wait_status(conn, after, {"finished"})["outcome"]["published"]
    assert row(conn, queued)["status"] == "canceled"


def test_sigterm_checkpoints_requeues_and_resumes(env, worker):
    w1 = worker()
    conn = connect(env)
    job_id = submit(env, "memory", "--set", "iterations=400", "--set", "save_every=10", "--set", "val_every=100000")
    wait_phase(conn, job_id, "train", min_step=15)
    w1.signal(signal.SIGTERM)
    assert w1.wait(timeout=60) == 0  # requested stop: exit 0 (supervisors do not restart it)
    assert row(conn, job_id)["status"] == "queued"  # requeued at the front
    interrupted = w1.events("job_interrupted")
    assert interrupted and "checkpoint" in interrupted[0]["reason"]
    w2 = worker()
    st = wait_status(conn, job_id, {"finished"}, timeout=240)
    resumed = w2.events("training_resumed")
    assert resumed and resumed[0]["step"] >= 15
    metrics = json.loads((Path(st["outcome"]["adapter_path"]) / "kd_metrics.json").read_text())
    assert metrics["timing"]["resumed_from"] >= 15 and metrics["train"][-1]["step"] == 400


def test_sigkill_then_restart_recovers_the_orphan(env, worker):
    w1 = worker(name="kd-crashy")
    conn = connect(env)
    job_id = submit(env, "memory", "--set", "iterations=400", "--set", "save_every=10", "--set", "val_every=100000")
    wait_phase(conn, job_id, "train", min_step=25)
    w1.signal(signal.SIGKILL)
    w1.wait(timeout=30)
    assert row(conn, job_id)["status"] == "started"  # what a crash leaves behind
    wait_for(lambda: not conn.exists(health_key("kd-crashy")), 10, what="the dead worker's health key to expire")
    w2 = worker(name="kd-crashy")
    assert w2.events("orphans_recovered")[0]["jobs"] == [job_id]
    st = wait_status(conn, job_id, {"finished"}, timeout=240)
    assert w2.events("training_resumed")[0]["step"] >= 20
    assert st["outcome"]["published"]


def test_refuses_functions_outside_the_allow_list_and_pickle(env, worker, tmp_path):
    w = worker()
    conn = connect(env)
    q = Queue("kd", connection=conn, serializer=JSONSerializer)
    marker = tmp_path / "pwned"
    evil = q.enqueue("os.system", f"touch {marker}")
    pickled = q.enqueue("os.getcwd", job_id="pickled")
    import pickle
    import zlib

    conn.hset("rq:job:pickled", "data", zlib.compress(pickle.dumps(("os.system", None, (f"touch {marker}",), {}))))
    for job in (evil, pickled):
        wait_for(
            lambda j=job: Job.fetch(j.id, connection=conn, serializer=JSONSerializer).get_status() == "failed",
            60,
            what=f"{job.id} to fail",
        )
    assert not marker.exists()
    err = Job.fetch(evil.id, connection=conn, serializer=JSONSerializer).latest_result().exc_string
    assert "SecurityError" in err and "not allowed" in err
    ok = submit(env, "memory")
    assert wait_status(conn, ok, {"finished"})["outcome"]["published"]  # worker alive
    assert w.proc.poll() is None


def test_malformed_data_fails_the_job_clearly_and_worker_lives_on(env, worker):
    import hashlib

    from jobs.models import TASK_FUNC, DataRef, KDJob

    worker()
    conn = connect(env)
    bad = b'{"prompt": "fine"}\n{"prompt": broken json\n'
    sha = hashlib.sha256(bad).hexdigest()
    conn.set(blob_key(sha), bad)
    job = KDJob(
        domain="memory", data=(DataRef(kind="prompts", sha256=sha, records=2, size=len(bad), name="bad.jsonl"),)
    )
    ticket = int(conn.incr("kd:seq:memory"))  # the meta a client writes; only the data is bad
    rq_job = Queue("kd", connection=conn, serializer=JSONSerializer).enqueue(
        TASK_FUNC,
        kwargs={"payload": job.model_dump(mode="json")},
        meta={"ticket": ticket, "domain": "memory", "submitter": "test"},
    )
    st = wait_status(conn, rq_job.id, {"failed"})
    assert "DataError" in st["error"] and "bad.jsonl line 2" in st["error"] and "not valid JSON" in st["error"]
    assert st.get("traceback", "").count("Traceback") >= 1
    ok = submit(env, "debug")
    assert wait_status(conn, ok, {"finished"})["outcome"]["published"]


def test_a_job_queued_by_kd_daemon_0_1_still_runs_after_the_upgrade(env, worker):
    """0.1 named the entry point kd_worker.task.run_kd_job; a job waiting under that name still runs."""
    import hashlib

    from jobs.models import LEGACY_TASK_FUNCS, DataRef, KDJob

    worker()
    conn = connect(env)
    data = (SAMPLES / "memory.jsonl").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    conn.set(blob_key(sha), data)
    ref = DataRef(kind="prompts", sha256=sha, records=len(data.splitlines()), size=len(data), name="memory.jsonl")
    job = KDJob(domain="memory", data=(ref,), overrides={"iterations": 3})
    ticket = int(conn.incr("kd:seq:memory"))  # what a 0.1 client wrote besides the function's name
    rq_job = Queue("kd", connection=conn, serializer=JSONSerializer).enqueue(
        LEGACY_TASK_FUNCS[0],
        kwargs={"payload": job.model_dump(mode="json")},
        meta={"ticket": ticket, "domain": "memory", "submitter": "kd-client"},
    )
    conn.zadd("kd:active:memory", {rq_job.id: ticket})
    assert wait_status(conn, rq_job.id, {"finished"})["outcome"]["published"]


def test_two_workers_share_a_queue_and_publish_each_domain_in_order(env, worker):
    worker(name="kd-a")
    worker(name="kd-b")
    conn = connect(env)
    ids = []
    for i in range(3):
        for domain in ("memory", "debug"):
            ids.append((domain, submit(env, domain, "--set", f"seed={i}")))
    for _, job_id in ids:
        wait_status(conn, job_id, {"finished"}, timeout=300)
    by_worker = {row(conn, j)["worker"] for _, j in ids}
    assert by_worker == {"kd-a", "kd-b"}
    adapters = Path(env["KD_ADAPTERS_DIR"])
    for domain in ("memory", "debug"):
        tickets = []
        for v in sorted((adapters / domain / "versions").iterdir()):
            job_id = json.loads((v / "manifest.json").read_text())["summary"]["job_id"]
            tickets.append(row(conn, job_id)["ticket"])
        assert tickets == sorted(tickets) and len(tickets) >= 1
        published = {
            json.loads((v / "manifest.json").read_text())["summary"]["job_id"]
            for v in (adapters / domain / "versions").iterdir()
        }
        for d, j in ids:
            o = row(conn, j)["outcome"]
            if d == domain:
                assert (j in published) == o["published"]
