"""The dashboard in a real headless browser: Debian's chromium driven by selenium through Debian's
chromium-driver (scripts/setup.sh installs both; nothing downloads a browser), a real
redis-server, a real `kd-worker run`, real jobs, and `kd-client dashboard` as a user starts it.

It checks that the overview lists the domain, that the domain page's loss curve is the job's
kd_metrics.json (data and drawn points), that a job page follows a running job to its end by
polling, that a rollback without the token is refused and one with it moves `current`. The
screenshot goes to tmp_path, or to $KD_DASHBOARD_SCREENSHOT when set (docs/dashboard.png)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import SAMPLES, connect, free_port, kd_client, venv_bin, wait_for, wait_status

from jobs import publisher

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them on Linux)",
)
TOKEN = "browser-test-dashboard-token"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # the driver named explicitly: selenium's manager never looks for (or downloads) one
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(env, tmp_path):
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen(
        [venv_bin("kd-client"), "dashboard", "--port", str(port)],
        env={**env, "KD_DASHBOARD_TOKEN": TOKEN},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import httpx

        if proc.poll() is not None:
            raise RuntimeError((tmp_path / "dashboard.log").read_text())
        try:
            return httpx.get(base + "/", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, what="kd-client dashboard to answer")
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def submit(env, *extra: str) -> str:
    out = kd_client(env, "submit", "--domain", "memory", "--prompts", str(SAMPLES / "memory.jsonl"), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def text_of(driver, element_id: str) -> str:
    """An element's text, or "" while the page (re)loads."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.ID, element_id).text)
    except WebDriverException:
        return ""


def polyline(driver, label: str) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.CSS_SELECTOR, f'polyline[data-label="{label}"]')
    return {k: el.get_attribute(k) for k in ("data-x", "data-y", "points")}


def assert_affine(values: list[float], pixels: list[float]) -> None:
    """The drawn coordinates are one affine map of the values (what a chart is)."""
    (v0, p0), (v1, p1) = (values[0], pixels[0]), (values[-1], pixels[-1])
    for v, p in zip(values, pixels, strict=True):
        assert p == pytest.approx(p0 + (v - v0) * (p1 - p0) / (v1 - v0), abs=0.02)


def check_loss_curve(driver, metrics: dict) -> None:
    import math

    train = polyline(driver, "train loss")
    steps = [r["step"] for r in metrics["train"]]
    losses = [r["loss"] for r in metrics["train"]]
    assert [int(x) for x in train["data-x"].split()] == steps
    assert [float(y) for y in train["data-y"].split()] == pytest.approx(losses, rel=1e-12)
    pts = [tuple(map(float, p.split(","))) for p in train["points"].split()]
    assert len(pts) == len(steps)
    assert_affine(steps, [x for x, _ in pts])
    assert_affine([math.log10(v) for v in losses], [y for _, y in pts])  # log scale
    assert pts[0][1] != pts[-1][1]
    val = polyline(driver, "held-out kl")
    assert [float(y) for y in val["data-y"].split()] == pytest.approx([r["kl"] for r in metrics["val"]])


def test_dashboard_in_a_real_browser(env, worker, dashboard, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root = Path(env["KD_ADAPTERS_DIR"])
    conn = connect(env)
    worker(name="browser-worker")
    first = submit(env)
    wait_status(conn, first, {"finished"})
    second = submit(env, "--set", "seed=1", "--force")  # --force: published whatever the gate says

    # the job page follows the running job by polling until it ends (then shows where it went)
    browser.get(f"{dashboard}/jobs/{second}")
    wait_for(
        lambda: text_of(browser, "job-status") == "finished" and "published memory v2" in text_of(browser, "outcome"),
        180,
        interval=0.5,
        what="the job page to show the second job finished and published",
    )

    browser.get(dashboard + "/")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[data-domain="memory"]')
    assert row.find_element(By.CSS_SELECTOR, "td.current-version").text == "v2"
    assert "browser-worker" in browser.find_element(By.ID, "workers").text

    browser.get(f"{dashboard}/domains/memory")
    v2 = publisher.resolve(root, "memory")
    assert v2 is not None and v2.number == 2
    check_loss_curve(browser, json.loads((v2.path / publisher.METRICS).read_text()))
    columns = browser.find_elements(By.CSS_SELECTOR, ".sample-column")
    assert [c.get_attribute("data-version") for c in columns] == ["2", "1"]
    samples = json.loads((v2.path / publisher.METRICS).read_text())["samples"]
    assert samples and samples[0]["prompt"].split()[0] in columns[0].text

    browser.save_screenshot(os.environ.get("KD_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png"))

    # without the token: refused, nothing moves
    Select(browser.find_element(By.ID, "rollback-to")).select_by_value("1")
    browser.find_element(By.ID, "rollback-submit").click()
    wait_for(lambda: text_of(browser, "message-title"), 20, what="the refusal page")
    assert browser.find_element(By.ID, "message-title").text == "Action refused"
    assert "wrong or missing dashboard token" in browser.find_element(By.ID, "message-text").text
    assert publisher.resolve(root, "memory").number == 2

    # with it: current moves to v1
    browser.get(f"{dashboard}/domains/memory")
    Select(browser.find_element(By.ID, "rollback-to")).select_by_value("1")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "rollback-submit").click()
    wait_for(lambda: text_of(browser, "rolled-back"), 20, what="the rolled-back page")
    assert "current is now v1" in browser.find_element(By.ID, "rolled-back").text
    assert publisher.resolve(root, "memory").number == 1
    browser.get(dashboard + "/")
    assert browser.find_element(By.CSS_SELECTOR, 'tr[data-domain="memory"] td.current-version').text == "v1"
