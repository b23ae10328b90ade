"""rq-dashboard keeps working on our queues: its own Flask app, in-process against the test Redis,
lists our queues, a queued job (JSON serializer, as `rq-dashboard --json` runs), our worker, and
the job once it finished. The operator's command: `rq-dashboard --redis-url $KD_REDIS_URL --json`."""

from __future__ import annotations

import pytest
from helpers import SAMPLES, connect, kd_client, wait_status
from rq.serializers import JSONSerializer

rq_dashboard_cli = pytest.importorskip("rq_dashboard.cli")
rq_dashboard_web = pytest.importorskip("rq_dashboard.web")


@pytest.fixture
def rq_dash(env, monkeypatch):
    monkeypatch.setattr(rq_dashboard_web.config, "serializer", JSONSerializer)  # what its --json flag sets
    app = rq_dashboard_cli.make_flask_app(None, None, None, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = env["KD_REDIS_URL"]
    rq_dashboard_cli.setup_rq_connection(app)
    return app.test_client()


def get(client, path: str) -> dict:
    r = client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.get_data(as_text=True)[:500])
    return r.get_json()


def test_rq_dashboard_lists_our_queues_jobs_and_worker(env, worker, rq_dash):
    job_id = kd_client(env, "submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl")).stdout.strip()
    queues = {q["name"]: q for q in get(rq_dash, "/0/data/queues.json")["queues"]}
    assert queues["kd"]["count"] == 1
    listed = get(rq_dash, "/0/data/jobs/kd/queued/10/asc/1.json")["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    info = get(rq_dash, f"/0/data/job/{job_id}.json")
    assert info["origin"] == "kd" and info["status"] == "queued" and '"domain": "memory"' in info["metadata"]
    assert "text/html" in rq_dash.get("/0/view/queues").content_type

    w = worker(name="rqdash-worker")
    wait_status(connect(env), job_id, {"finished"})
    workers = get(rq_dash, "/0/data/workers.json")["workers"]
    assert [x["name"] for x in workers] == ["rqdash-worker"] and "kd" in workers[0]["queues"]
    finished = get(rq_dash, "/0/data/jobs/kd/finished/10/asc/1.json")["jobs"]
    assert [j["id"] for j in finished] == [job_id]
    assert get(rq_dash, f"/0/data/job/{job_id}.json")["status"] == "finished"
    w.stop()
