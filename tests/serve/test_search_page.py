"""The search page at ``/`` in a real headless browser (Debian's chromium through selenium and chromedriver).

One module-scoped service (``priorclip-tiny``) over a 12-tile index made by ``priorclip index build --dataset``
(four colour classes, three tiles each, with captions), plus a second service without an index. The reference for
every result the page draws is the HTTP API itself: the same query POSTed to ``/search`` must give the same ids,
scores and order as the cards. Skipped, with the reason, where chromium or chromedriver is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from priorclip.serve.app import create_app
from priorclip.serve.cli import ServerThread, build_service
from priorclip.serve.service import BatchingOptions, EmbeddingService

# Never let selenium-manager fetch a browser or driver: explicit paths below, and offline if it is reached anyway.
os.environ["SE_OFFLINE"] = "1"

CLASSES = {  # class -> (base colour, caption); three tiles each, told apart by seeded texture
    "forest": ((34, 110, 40), "dense green forest with many trees"),
    "lake": ((30, 70, 160), "a calm blue lake surrounded by land"),
    "desert": ((210, 180, 110), "bare yellow desert with dunes"),
    "industrial": ((140, 140, 150), "grey industrial buildings and roads"),
}
PER_CLASS = 3
WAIT_S = 20


def _browser_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


pytestmark = pytest.mark.skipif(_browser_paths() is None, reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver)")


# ------------------------------------------------------------------------------------------------------ fixtures
def make_dataset(root: Path) -> Path:
    """Karpathy-style JSON plus images/: PER_CLASS tiles of each class, one caption each."""
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    rng = np.random.default_rng(0)
    for name, (colour, caption) in CLASSES.items():
        for i in range(1, PER_CLASS + 1):
            tile = np.clip(np.array(colour, float) + rng.normal(0, 28, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile, "RGB").save(images / f"{name}_{i}.png")
            entries.append({"filename": f"{name}_{i}.png", "split": "test", "sentences": [{"raw": f"{caption} {i}"}]})
    path = root / "tiles.json"
    path.write_text(json.dumps({"images": entries}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from priorclip.serve.index_cli import index

    root = tmp_path_factory.mktemp("search-page")
    dataset = make_dataset(root)
    out = root / "tiles.index"
    r = CliRunner().invoke(index, ["build", str(out), "--dataset", str(dataset), "--model", "priorclip-tiny",
                                   "--device", "cpu", "--workers", "1"])
    assert r.exit_code == 0, r.output
    batching = BatchingOptions(max_batch=4, max_wait_ms=2, max_queue=256, cache_size=64)
    # the start-up self-test has its own tests (test_http): here it would only make the page's tests hostage to it
    service = build_service(model_name="priorclip-tiny", index=out, batching=batching, selftest=False)
    bare = EmbeddingService(service.loaded, index=None, batching=batching, selftest=False)  # same engine, no index
    for s in (service, bare):
        s.start(block=True)
        assert s.state == "ready", s.selftest
    with ServerThread(create_app(service)) as url, ServerThread(create_app(bare)) as bare_url:
        with httpx.Client(base_url=url, timeout=60) as api:
            yield {"url": url, "bare_url": bare_url, "api": api, "images": root / "images", "root": root,
                   "model": service.model_id}
    service.stop()
    bare.stop()


@pytest.fixture(scope="module")
def browser(site):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------------- helpers
def wait(driver, predicate, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: predicate(d), message=what)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: d.find_element("id", "status").text.endswith("ready"), "status line says ready")
    driver.get_log("browser")  # start each test with an empty console


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """SEVERE console entries (script errors, failed loads) except failed /search calls the test provoked."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def message(driver) -> tuple[str, str]:
    m = driver.find_element("id", "message")
    return m.text, m.get_attribute("class") or ""


def wait_message(driver, start: str) -> str:
    wait(driver, lambda d: message(d)[0].startswith(start), f"message starting {start!r}")
    return message(driver)[0]


def cards(driver) -> list[dict]:
    """What the analyst sees on each result card: rank, id, score (as shown), meta line, thumbnail."""
    out = []
    for c in driver.find_elements("css selector", "#results .hit"):
        metas = c.find_elements("css selector", ".meta")
        out.append({"rank": c.find_element("css selector", ".rank").text,
                    "id": c.find_element("css selector", ".id").text,
                    "score": float(c.find_element("css selector", ".score").text),
                    "meta": metas[0].text if metas else None, "el": c})
    return out


def search_api(site, **query) -> list[dict]:
    r = site["api"].post("/search", json=query)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_cards_equal_api(shown: list[dict], ref: list[dict]) -> None:
    assert [c["id"] for c in shown] == [h["id"] for h in ref]
    assert [c["rank"] for c in shown] == [f"#{h['rank']}" for h in ref] == [f"#{i}" for i in range(1, len(ref) + 1)]
    # shown with 4 decimals
    np.testing.assert_allclose([c["score"] for c in shown], [h["score"] for h in ref], rtol=0, atol=5.1e-5)
    assert [c["meta"] for c in shown] == [h["meta"]["captions"][0] for h in ref]


def set_k(driver, k: int) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "k")).select_by_visible_text(str(k))


def type_query(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "text")
    box.clear()
    box.send_keys(text + Keys.ENTER)


def thumbnails_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .hit img')];"
        "imgs.forEach(i => i.scrollIntoView({block: 'nearest'}));"  # lazy images load once in view
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")


# ---------------------------------------------------------------------------------------------------------- tests
def test_page_loads_with_status_and_no_console_errors(site, browser):
    browser.get(site["url"] + "/")
    wait(browser, lambda d: d.find_element("id", "status").text.endswith("ready"), "status line says ready")
    status = browser.find_element("id", "status")
    assert status.text == f"{site['model']} · fp32 on cpu · 12 tiles indexed (flat) · ready"
    assert "bad" not in (status.get_attribute("class") or "")
    assert browser.title == "priorclip search"
    # every control has an accessible name (a label, or the button's text)
    for el in browser.find_elements("css selector", "input, select"):
        assert browser.find_elements("css selector", f"label[for='{el.get_attribute('id')}']"), el.get_attribute("id")
    assert browser.find_element("id", "go").text == "Search"
    assert console_errors(browser) == []


def test_caption_search_shows_the_apis_top_k(site, browser, tmp_path):
    open_page(browser, site["url"])
    caption = "dense green forest with many trees"
    for k in (10, 5):  # a second search replaces the first one's cards
        set_k(browser, k)
        type_query(browser, caption)
        wait_message(browser, f"{k} results for “{caption}”")
        ref = search_api(site, text=caption, k=k)
        assert len(ref) == k and [h["score"] for h in ref] == sorted((h["score"] for h in ref), reverse=True)
        # the API's order is not one the page could fake by sorting ids
        ids = [h["id"] for h in ref]
        assert ids not in (sorted(ids), sorted(ids, reverse=True))
        shown = cards(browser)
        assert_cards_equal_api(shown, ref)
        wait(browser, thumbnails_loaded, "every thumbnail loaded")
        if k == 10:
            shot = tmp_path / "search-page.png"
            browser.execute_script("window.scrollTo(0, 0)")
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            if os.environ.get("PRIORCLIP_KEEP_SCREENSHOT"):  # to look at it by hand
                shutil.copy(shot, os.environ["PRIORCLIP_KEEP_SCREENSHOT"])
    # a thumbnail links to the full-size image of its own item
    link = shown[0]["el"].find_element("css selector", "a.thumb").get_attribute("href")
    assert link.startswith(site["url"] + "/items/image?id=") and site["api"].get(link).status_code == 200
    assert console_errors(browser) == []


def test_image_query_through_the_file_input(site, browser):
    open_page(browser, site["url"])
    path = site["images"] / "desert_2.png"
    browser.find_element("id", "file").send_keys(str(path))
    wait_message(browser, "12 results for image desert_2.png")
    shown = cards(browser)
    assert shown[0]["id"] == "desert_2.png" and shown[0]["score"] > 0.9999
    r = site["api"].post("/search", files={"image": ("desert_2.png", path.read_bytes(), "image/png")}, data={"k": "20"})
    assert r.status_code == 200, r.text
    assert_cards_equal_api(shown, r.json()["results"])
    assert browser.find_element("id", "droplabel").text == "desert_2.png"
    assert browser.find_element("id", "preview").is_displayed()
    wait(browser, thumbnails_loaded, "every thumbnail loaded")
    assert console_errors(browser) == []


def test_similar_tiles_runs_an_id_query(site, browser):
    open_page(browser, site["url"])
    set_k(browser, 5)
    type_query(browser, "a calm blue lake surrounded by land")
    wait_message(browser, "5 results for")
    target = cards(browser)[2]
    target["el"].find_element("css selector", "button.like").click()
    wait_message(browser, f"5 results for tiles similar to {target['id']}")
    shown = cards(browser)
    assert shown[0]["id"] == target["id"] and shown[0]["score"] > 0.9999  # its own vector ranks itself first
    assert_cards_equal_api(shown, search_api(site, id=target["id"], k=5))
    assert console_errors(browser) == []


def test_errors_are_shown_readably(site, browser, tmp_path):
    # a service without an index: the status line and a search both say so
    open_page(browser, site["bare_url"])
    status = browser.find_element("id", "status")
    assert "no index" in status.text and "bad" in status.get_attribute("class")
    type_query(browser, "a calm blue lake")
    text = wait_message(browser, "Error 404")
    assert text == "Error 404: this service has no index (start it with --index INDEX)"
    assert message(browser)[1] == "error" and cards(browser) == []
    assert console_errors(browser, allowed=("/search",)) == []

    # a corrupt image file: the service's 422 reason, and the previous results are cleared
    open_page(browser, site["url"])
    type_query(browser, "bare yellow desert with dunes")
    wait_message(browser, "12 results for")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really an image")
    browser.find_element("id", "file").send_keys(str(bad))
    text = wait_message(browser, "Error 422")
    r = site["api"].post("/search", files={"image": ("broken.png", bad.read_bytes(), "image/png")})
    assert r.status_code == 422 and text == f"Error 422: {r.json()['error']['message']}"
    assert message(browser)[1] == "error" and cards(browser) == []

    # nothing to search for
    browser.get(site["url"] + "/")
    browser.find_element("id", "go").click()
    assert wait_message(browser, "Type a description") and message(browser)[1] == "error"
    assert console_errors(browser, allowed=("/search",)) == []
