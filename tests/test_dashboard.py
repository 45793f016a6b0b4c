"""The dashboard page in a real browser (Debian's chromium, driven by Selenium through its
chromedriver) against a running 2-node pipeline: it loads without console errors, shows both
nodes with their layer ranges, streams a chat answer, and shows a node going down when its
process is killed. A screenshot is saved under the test's temporary folder."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import httpx
import pytest

from mesh.server.app import build_app
from tests.conftest import ServerThread

pytestmark = pytest.mark.real


def _browser(tmp_path):
    chromium = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                     if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # CI preloads OpenBLAS for MLX; chromium's GPU process dies with it preloaded
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return webdriver.Chrome(service=Service(executable_path=driver, env=env), options=opts)


def _wait(driver, cond, timeout: float, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def _node(driver, name) -> dict | None:
    """A node card as the page shows it now, read in one script call (the page redraws its
    cards every second, so element handles go stale between two calls)."""
    return driver.execute_script("""
        const el = document.querySelector(`[data-node="${arguments[0]}"]`);
        return el && {state: el.getAttribute("data-state"), text: el.innerText};
    """, name)


def test_dashboard_shows_the_pipeline_streams_a_chat_and_a_node_going_down(tmp_path):
    from selenium.webdriver.common.by import By

    from mesh.pipeline.coordinator import build_pipeline_engine

    engine = build_pipeline_engine("smollm2-135m", local_nodes=1, secret="s" * 16,
                                   context_length=1024, lost_after=3.0)
    driver = None
    try:
        with ServerThread(build_app(engine)) as srv:
            health = httpx.get(srv.base_url + "/health", timeout=10).json()
            ranges = {s["node"]: s["layers"] for s in health["stages"]}
            assert set(ranges) == {"coordinator", "local-1"}, ranges
            driver = _browser(tmp_path)
            driver.get(srv.base_url + "/")  # redirects to /dashboard
            _wait(driver, lambda d: _node(d, "local-1") is not None, 30, "the nodes to appear")
            for name, layers in ranges.items():
                card = _node(driver, name)
                assert card["state"] == "up"
                assert f"layers {layers}" in card["text"], card["text"]
            _wait(driver, lambda d: "memory" in _node(d, "local-1")["text"], 10,
                  "the node's memory (from its heartbeat)")

            prompt = driver.find_element(By.ID, "prompt")
            prompt.send_keys("What is the capital of France?")
            driver.find_element(By.ID, "send").click()
            answer = _wait(driver, lambda d: next(
                (m for m in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
                 if m.get_attribute("data-streaming") == "0"), None), 120, "the chat answer")
            assert "error" not in answer.get_attribute("class"), answer.text
            assert answer.text.strip()
            assert int(answer.get_attribute("data-chunks") or 0) > 1  # streamed, not one blob
            _wait(driver, lambda d: "compute" in _node(d, "local-1")["text"], 10,
                  "the stage's speed after a request")
            before = tmp_path / "dashboard-up.png"
            driver.save_screenshot(str(before))

            os.kill(engine.node_processes["local-1"].pid, signal.SIGKILL)
            _wait(driver, lambda d: (_node(d, "local-1") or {}).get("state") == "down", 30,
                "local-1 shown down after its process was killed")
            _wait(driver, lambda d: "lost local-1" in d.find_element(By.ID, "events").text, 10,
                  "the loss in the events")
            shot = tmp_path / "dashboard.png"
            driver.save_screenshot(str(shot))
            print(f"dashboard screenshots: {before} {shot}")
            assert shot.stat().st_size > 10_000

            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        asyncio.run(engine.close())


def test_dashboard_state_needs_the_key_and_the_page_does_not(tiny_models):
    from mesh.backends.base import load_shard
    from mesh.engine.local import LocalEngine
    from mesh.layers import LayerRange
    from mesh.models.source import resolve

    source = resolve(str(tiny_models["llama"]))
    shard = load_shard("torch", source, LayerRange.full(source.num_layers))
    engine = LocalEngine("tiny", [shard], source.tokenizer, 256)
    with ServerThread(build_app(engine, api_keys=["k" * 32])) as srv:
        page = httpx.get(srv.base_url + "/dashboard", timeout=10)
        assert page.status_code == 200 and "<svg" in page.text
        js = httpx.get(srv.base_url + "/dashboard/static/dashboard.js", timeout=10)
        assert js.status_code == 200 and "fetch(" in js.text
        assert httpx.get(srv.base_url + "/dashboard/state", timeout=10).status_code == 401
        state = httpx.get(srv.base_url + "/dashboard/state", timeout=10,
                          headers={"Authorization": "Bearer " + "k" * 32}).json()
        assert state["mode"] == "local" and state["nodes"][0]["name"] == "local"
        node = state["nodes"][0]
        assert node["start"] == 0 and node["end"] == node["total"] > 0
        assert node["rss_bytes"] > 0 and node["kv_bytes"] == 0
