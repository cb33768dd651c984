"""The report and the viewer in a real headless Chromium (Debian's, driven by Selenium).

`make test` installs chromium and chromium-driver (`make browser`); under CI a missing
browser fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cscvision.cli import main

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"
# Without the background-networking flags Chromium keeps dialling hosts this closed machine
# cannot reach.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,860")  # fmt: skip


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "chromium and chromium-driver are not installed: run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, name: str) -> np.ndarray:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_report_page_in_the_browser(browser, demo_batch, tmp_path):
    out = tmp_path / "infer"
    shutil.copytree(demo_batch["out"], out)
    assert main(["report", str(out), "--cohort", str(demo_batch["cohort"])]) == 0
    browser.get((out / "report" / "index.html").as_uri())
    cards = browser.find_elements("css selector", "article.slide-card")
    assert len(cards) == len(demo_batch["slides"])
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded and all(loaded), "every image loads from the report's own assets"
    header = browser.find_element("css selector", "#cohort-table th[data-col='1']")
    header.click()  # the sort script runs
    assert header.get_attribute("aria-sort") == "ascending"
    assert console_errors(browser) == []
    pixels = screenshot(browser, "report.png")
    assert pixels.std() > 10, "the report screenshot is not blank"


@pytest.fixture(scope="module")
def viewer_url(demo_batch):
    import uvicorn

    from cscvision.views.app import create_app
    from cscvision.views.server import Catalogue

    app = create_app(Catalogue(demo_batch["out"]))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, what="the viewer server")
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_viewer_shows_tiles_toggles_and_thresholds(browser, viewer_url):
    url, app = viewer_url
    browser.get(url + "/")
    wait_for(
        lambda: browser.execute_script(
            "return window.cscv && Object.values(window.cscv.layers).length === 3 && "
            "Object.values(window.cscv.layers).every(l => l.item)"
        ),
        what="both heatmap layers and the OOD layer",
    )
    # the demo model keeps an OOD record: its map is a third layer, hidden until switched on
    assert browser.execute_script("return window.cscv.layers['ood'].visible") is False
    assert not browser.find_element("id", "toggle-ood").is_selected()
    wait_for(lambda: any(k == "slide" for k, *_ in list(app.state.requests)),
             what="Deep Zoom tiles of the slide")  # fmt: skip
    wait_for(lambda: any(k == "map" for k, *_ in list(app.state.requests)), what="map tiles")
    before = screenshot(browser, "viewer.png")
    assert before.std() > 10, "the viewer screenshot is not blank"

    target = browser.execute_script("return Object.keys(window.cscv.layers)[0]")
    browser.find_element("id", f"toggle-{target}").click()
    assert browser.execute_script(
        f"return window.cscv.layers['{target}'].item.getOpacity()") == 0  # fmt: skip

    browser.execute_script(
        f"var s = document.getElementById('threshold-{target}'); s.value = '0.25';"
        "s.dispatchEvent(new Event('change'));"
    )
    wait_for(lambda: browser.execute_script(
        f"return window.cscv.layers['{target}'].loaded || ''").endswith("threshold=0.25"),
        what="the layer reloaded at the new threshold")  # fmt: skip
    assert browser.find_element("id", f"threshold-value-{target}").text == "0.25"

    from selenium.webdriver.common.action_chains import ActionChains

    canvas = browser.find_element("css selector", "#viewer .openseadragon-canvas")
    ActionChains(browser).move_to_element(canvas).move_by_offset(5, 5).perform()
    readout = wait_for(lambda: browser.find_element("id", "readout").text.startswith("x "),
                       what="cursor readout")  # fmt: skip
    assert readout and target in browser.find_element("id", "readout").text
    screenshot(browser, "viewer_threshold.png")
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def ood_batch(cmu_svs, tmp_path_factory):
    """The real CMU slide scored by the demo model: out of distribution for it."""
    out = tmp_path_factory.mktemp("ood") / "infer"
    assert main(["infer", str(cmu_svs), "--model", "demo", "--out", str(out),
                 "--workers", "0", "--threads", "1"]) == 0  # fmt: skip
    return out


@pytest.mark.slow
def test_ood_slide_has_a_banner_in_report_and_viewer(browser, ood_batch):
    import uvicorn

    from cscvision.views.app import create_app
    from cscvision.views.server import Catalogue

    assert main(["report", str(ood_batch), "--model", "demo"]) == 0
    browser.get((ood_batch / "report" / "index.html").as_uri())
    banner = browser.find_element("css selector", "article.slide-card .ood-banner")
    assert banner.is_displayed() and "Out of distribution" in banner.text
    browser.execute_script("arguments[0].scrollIntoView()", banner)
    screenshot(browser, "report_ood.png")
    srv = uvicorn.Server(uvicorn.Config(create_app(Catalogue(ood_batch)), host="127.0.0.1",
                                        port=0, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started, what="the viewer server")
        port = srv.servers[0].sockets[0].getsockname()[1]
        browser.get(f"http://127.0.0.1:{port}/")
        shown = wait_for(
            lambda: browser.find_element("id", "banner").is_displayed(), what="the OOD banner"
        )
        assert shown and "Do not trust" in browser.find_element("id", "banner").text
        time.sleep(1.5)  # the slide's tiles load
        screenshot(browser, "viewer_ood.png")
        toggle = browser.find_element("id", "toggle-ood")  # the OOD map: a layer, off at first
        assert not toggle.is_selected()
        toggle.click()
        time.sleep(1.5)
        screenshot(browser, "viewer_ood_layer.png")
        assert console_errors(browser) == []
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_viewer_shows_the_maps_alone_when_the_slide_file_is_gone(browser, demo_batch, tmp_path):
    import json

    import uvicorn

    from cscvision.views.app import create_app
    from cscvision.views.server import Catalogue

    out = tmp_path / "out"
    shutil.copytree(demo_batch["out"], out)
    for summary in out.glob("*/summary.json"):
        record = json.loads(summary.read_text())
        record["slide_path"] = str(tmp_path / "moved-away.svs")
        summary.write_text(json.dumps(record))
    app = create_app(Catalogue(out))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started, what="the viewer server")
        port = srv.servers[0].sockets[0].getsockname()[1]
        browser.get(f"http://127.0.0.1:{port}/")
        wait_for(
            lambda: browser.execute_script(
                "return window.cscv && Object.values(window.cscv.layers).length > 0 && "
                "Object.values(window.cscv.layers).every(l => l.item)"
            ),
            what="the heatmap layers without their slide",
        )
        wait_for(lambda: any(k == "map" for k, *_ in list(app.state.requests)), what="map tiles")
        assert "slide file not found" in browser.find_element("id", "readout").text
        assert not any(k == "slide" for k, *_ in list(app.state.requests))
        assert screenshot(browser, "viewer_slide_gone.png").std() > 3, "the maps are drawn"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
