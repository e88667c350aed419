"""The report in a real browser: Debian's headless Chromium (selenium + chromedriver) renders the
report.html of the pipeline test's run dir (the session fixture `pipeline_run_dir`).

Checked at a typical and a narrow window width: no JavaScript or console errors, every image loaded,
nothing wider than the window (no horizontal scrolling), and a "what it is about" section for every
cluster with its latents (peak tokens marked), words and example prompts. A full-page screenshot is
kept beside the report: `<run_dir>/report/report_screenshot.png` (the CI artifact).

`make test` installs chromium and chromium-driver first where they are missing (`make browser`).
Without them the test skips, except under CI (`CI` set), where it fails.
"""

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WIDTHS = (1280, 800)
SCREENSHOT_MAX_HEIGHT = 16_000  # Chromium captures at most ~16k pixels in one screenshot

# What the checks read from the page, one script each.
IMAGES_JS = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);"
WIDTH_JS = """
const w = window.innerWidth;
const wide = Array.from(document.body.querySelectorAll('*'))
  .filter(e => e.getBoundingClientRect().right > w + 0.5)
  .slice(0, 5).map(e => e.tagName + ': ' + e.textContent.slice(0, 60));
return [w, document.documentElement.scrollWidth, wide];"""
CLUSTERS_JS = """
return Array.from(document.querySelectorAll('section.cluster')).map(s => ({
  cluster: Number(s.dataset.cluster),
  latents: s.querySelectorAll('ul.latents li').length,
  marks: s.querySelectorAll('ul.latents mark').length,
  words: s.querySelectorAll('p.words b').length - 1,
  examples: s.querySelectorAll('ol.examples li').length}));"""


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        why = f"{', '.join(missing)} missing: `make browser` installs Debian's chromium and chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def _viewport(driver, width: int, height: int) -> None:
    """Exact window.innerWidth/innerHeight (a window size would include the browser's own frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def test_report_renders_in_chromium(pipeline_run_dir, browser):
    report = pipeline_run_dir / "report" / "report.html"
    sizes = pq.read_table(pipeline_run_dir / "signals/assignments.parquet").to_pandas()["cluster"].value_counts()
    _viewport(browser, WIDTHS[0], 1000)
    browser.get(report.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title == "saerl-ray report"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors

    images = browser.execute_script(IMAGES_JS)
    assert len(images) >= 5 and all(done and width > 0 for done, width, _ in images), images

    for width in WIDTHS:
        _viewport(browser, width, 1000)
        inner, scroll, wide = browser.execute_script(WIDTH_JS)
        assert inner == width and scroll <= inner, f"page {scroll}px wide in a {inner}px window: {wide}"

    clusters = browser.execute_script(CLUSTERS_JS)
    assert sorted(c["cluster"] for c in clusters) == sorted(sizes.index)
    for c in clusters:
        assert c["latents"] >= 1 and c["marks"] >= c["latents"], c  # every latent shown with its peak token
        assert c["words"] >= 1, c
        assert c["examples"] == min(3, sizes[c["cluster"]]), c

    _viewport(browser, WIDTHS[0], 1000)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    _viewport(browser, WIDTHS[0], min(height, SCREENSHOT_MAX_HEIGHT))
    shot = pipeline_run_dir / "report" / "report_screenshot.png"
    shot.write_bytes(browser.get_screenshot_as_png())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")
