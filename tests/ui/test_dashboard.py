"""The dashboard in a real headless Chromium: it loads, draws, and updates itself as jobs complete."""

import os
import shutil

import pytest

from cluster_import import LocalCluster
from conftest import ROOT

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("ui"), cluster_max_workers=2)
    cluster.fire()
    yield cluster
    cluster.teardown()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout, message):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def card(driver, name):
    from selenium.webdriver.common.by import By

    elements = driver.find_elements(By.ID, f"card-{name}")
    return int(elements[0].text) if elements and elements[0].text.isdigit() else None


def test_the_dashboard_draws_its_charts_and_updates_without_reloading(cluster, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{cluster.endpoint_port}/")
    wait_for(browser, lambda d: card(d, "completed") is not None, 15, "the status cards")
    before = card(browser, "completed")
    browser.execute_script("window.notReloaded = true;")

    # A few waves of work, so that the charts have a shape to draw.
    ids = []
    for wave in range(3):
        wave_ids = [cluster.enqueue(f"dashboard {wave} {n}".encode(), 400_000 * (wave + 1)).json()["id"]
                    for n in range(2)]
        cluster.wait_completed(wave_ids, timeout=60)
        ids += wave_ids
    wait_for(browser, lambda d: card(d, "completed") == before + 6, 15, "the completed count to move")
    assert browser.execute_script("return window.notReloaded === true;"), "the page reloaded"

    def points(driver, chart):
        lines = driver.find_elements(By.CSS_SELECTOR, f"svg#{chart} polyline")
        return len(lines[0].get_attribute("points").split()) if lines else 0

    for chart in ("jobs", "workers", "rate", "duration"):
        wait_for(browser, lambda d: points(d, chart) >= 2, 10, f"a line on the {chart} chart")
    wait_for(browser, lambda d: ids[-1] in d.find_element(By.ID, "latest").text, 10, "the latest jobs table")
    decisions = browser.find_element(By.ID, "decisions").text
    assert "workers wanted" in decisions

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("DW_UPDATE_SCREENSHOT"):
        shutil.copy(shot, os.path.join(ROOT, "docs", "dashboard.png"))


def test_the_dashboard_says_when_the_cluster_is_unreachable(cluster, browser):
    from selenium.webdriver.common.by import By

    pid = cluster.service_pid("dynamic_workload balancer")
    browser.get(f"http://127.0.0.1:{cluster.endpoint_port}/")
    wait_for(browser, lambda d: card(d, "completed") is not None, 15, "the status cards")
    os.kill(pid, 19)  # SIGSTOP: the balancer stops answering
    try:
        wait_for(browser, lambda d: "unreachable" in d.find_element(By.ID, "state").text, 20,
                 "the page to say the cluster is unreachable")
    finally:
        os.kill(pid, 18)  # SIGCONT
    wait_for(browser, lambda d: "updated" in d.find_element(By.ID, "state").text, 20, "recovery")
