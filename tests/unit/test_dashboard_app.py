"""The dashboard's routes through Starlette's test client: pages, actions and their checks."""

from __future__ import annotations

import re

import fakeredis
import pytest
from helpers import enqueue, publish_version
from starlette.testclient import TestClient

from jobs import publisher
from kd_client import queue as Q
from kd_client.dashboard.app import create_app
from kd_client.settings import ClientSettings

TOKEN = "a-long-dashboard-token"
BASE = "http://127.0.0.1:8741"
SAME = {"origin": BASE, "sec-fetch-site": "same-origin"}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "adapters_kd"
    for i in range(3):
        publish_version(r, "memory", i)
    return r


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def client(root, conn, token: str | None = TOKEN) -> TestClient:
    settings = ClientSettings(adapters_dir=root, dashboard_token=token)
    return TestClient(create_app(settings, conn=conn), base_url=BASE)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def message(html: str) -> str:
    return re.search(r'id="message-text">([^<]*)<', html).group(1)


def current(root) -> int:
    return publisher.resolve(root, "memory").number


def test_pages_render_and_carry_security_headers(root, conn):
    c = client(root, conn)
    job_id = enqueue(conn, ClientSettings(), "memory")
    for path in ("/", "/domains/memory", "/domains/memory?version=1", f"/jobs/{job_id}", f"/jobs/{job_id}/live"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert (
            "frame-ancestors 'none'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
        )
    overview = c.get("/").text
    assert 'data-domain="memory"' in overview and 'class="current-version">v3<' in overview
    domain = c.get("/domains/memory").text
    assert 'data-label="train loss"' in domain and 'id="rollback-form"' in domain and "after 2" in domain
    assert "position 1 of 1 in kd" in c.get(f"/jobs/{job_id}").text


@pytest.mark.parametrize(
    "path, status",
    [
        ("/domains/Memory", 404),
        ("/domains/..%2F..%2Fetc", 404),
        ("/domains/debug", 404),
        ("/domains/memory?version=x", 400),
        ("/jobs/not-a-job", 404),
        ("/jobs/kd-memory-" + "0" * 20, 404),
        ("/static/..%2F..%2Fapp.py", 404),
        ("/static/templates/base.html", 404),
    ],
)
def test_bad_names_and_paths_are_refused(root, conn, path, status):
    assert client(root, conn).get(path).status_code == status


def test_static_files_are_the_two_package_files(root, conn):
    c = client(root, conn)
    assert c.get("/static/job.js").headers["content-type"].startswith("text/javascript")
    assert "body {" in c.get("/static/dashboard.css").text


def test_an_unknown_host_header_is_refused(root, conn):
    assert client(root, conn).get("/", headers={"host": "attacker.example"}).status_code == 400


def test_rollback_with_token_and_csrf_moves_current(root, conn):
    c = client(root, conn)
    csrf = csrf_of(c.get("/domains/memory").text)
    r = c.post(
        "/domains/memory/rollback", data={"to": "1", "token": TOKEN, "csrf": csrf}, headers=SAME, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/domains/memory?rolled_back=1"
    assert current(root) == 1
    assert "current is now v1" in c.get(r.headers["location"]).text


@pytest.mark.parametrize(
    "form, headers, why",
    [
        ({"to": "1", "token": "wrong-token-value"}, SAME, "wrong or missing dashboard token"),
        ({"to": "1"}, SAME, "wrong or missing dashboard token"),
        ({"to": "1", "token": TOKEN, "csrf": "1.deadbeef"}, SAME, "expired"),
        ({"to": "1", "token": TOKEN, "csrf": None}, SAME, "expired"),
        (
            {"to": "1", "token": TOKEN},
            {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
            "another site",
        ),
    ],
)
def test_rollback_without_token_csrf_or_same_origin_is_refused(root, conn, form, headers, why):
    c = client(root, conn)
    form = dict(form)
    if "csrf" not in form:
        form["csrf"] = csrf_of(c.get("/domains/memory").text)
    form = {k: v for k, v in form.items() if v is not None}
    r = c.post("/domains/memory/rollback", data=form, headers=headers)
    assert r.status_code == 403 and why in message(r.text)
    assert current(root) == 3


def test_a_csrf_token_for_another_action_is_refused(root, conn):
    c = client(root, conn)
    job_id = enqueue(conn, ClientSettings(), "memory")
    cancel_csrf = csrf_of(c.get(f"/jobs/{job_id}").text)
    r = c.post("/domains/memory/rollback", data={"to": "1", "token": TOKEN, "csrf": cancel_csrf}, headers=SAME)
    assert r.status_code == 403 and current(root) == 3


def test_actions_are_disabled_without_a_configured_token(root, conn):
    c = client(root, conn, token=None)
    page = c.get("/domains/memory").text
    assert 'id="rollback-submit" disabled' in page and "KD_DASHBOARD_TOKEN" in page
    r = c.post("/domains/memory/rollback", data={"to": "1", "token": "", "csrf": csrf_of(page)}, headers=SAME)
    assert r.status_code == 403 and "disabled" in message(r.text) and current(root) == 3


def test_a_rollback_to_a_missing_version_is_a_conflict(root, conn):
    c = client(root, conn)
    csrf = csrf_of(c.get("/domains/memory").text)
    r = c.post("/domains/memory/rollback", data={"to": "9", "token": TOKEN, "csrf": csrf}, headers=SAME)
    assert r.status_code == 409 and "has no version 9" in message(r.text) and current(root) == 3


def test_cancel_through_the_form(root, conn):
    c = client(root, conn)
    job_id = enqueue(conn, ClientSettings(), "memory")
    csrf = csrf_of(c.get(f"/jobs/{job_id}").text)
    refused = c.post(f"/jobs/{job_id}/cancel", data={"token": "nope-nope-nope", "csrf": csrf}, headers=SAME)
    assert refused.status_code == 403 and Q.fetch(conn, job_id).get_status() == "queued"
    r = c.post(f"/jobs/{job_id}/cancel", data={"token": TOKEN, "csrf": csrf}, headers=SAME, follow_redirects=False)
    assert r.status_code == 303 and Q.fetch(conn, job_id).get_status() == "canceled"
    assert 'data-final="1"' in c.get(f"/jobs/{job_id}/live").text


def test_with_redis_down_the_overview_shows_disk_and_job_pages_say_why(root):
    dead = Q.connect(ClientSettings(redis_url="redis://127.0.0.1:1/0"), retries=0)  # nothing listens on port 1
    c = client(root, dead)
    r = c.get("/")
    assert r.status_code == 200 and 'id="redis-down"' in r.text and 'data-domain="memory"' in r.text
    assert c.get("/domains/memory").status_code == 200
    job = c.get("/jobs/kd-memory-" + "0" * 20)
    assert job.status_code == 503 and "Redis is unreachable" in job.text


def test_text_from_adapters_and_jobs_is_escaped(tmp_path, conn):
    root = tmp_path / "adapters_kd"
    publish_version(root, "memory", 0)
    v = publisher.resolve(root, "memory")
    doc = (v.path / publisher.METRICS).read_text().replace("after 0", "<script>alert(1)</script>")
    # a new version with hostile text (published versions are immutable; publish another)
    publisher.publish(root, "memory", lambda stage: (stage / publisher.METRICS).write_text(doc), {"metrics": {}})
    page = client(root, conn).get("/domains/memory").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
