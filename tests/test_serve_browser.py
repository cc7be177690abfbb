"""The web app end to end in headless Chromium (the system's, driven by Playwright): upload, watch, download.

``NST_SCREENSHOT=docs/web_app.png`` also saves the page mid-run there (the README's screenshot); with
``NST_SCREENSHOT_WEIGHTS=FILE`` (a VGG-16 weights file) the run uses it rather than random weights.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")
uvicorn = pytest.importorskip("uvicorn", reason="the browser test needs uvicorn: pip install -e '.[web]'")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[web]'"
)

from PIL import Image  # noqa: E402

from nst_lightning.serve.app import create_app  # noqa: E402
from tests.conftest import REPO  # noqa: E402

CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
SAMPLES = REPO / "nst_lightning" / "samples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The app under uvicorn on a free local port, in a thread; stopped (and its runs with it) at the end."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    weights = os.environ.get("NST_SCREENSHOT_WEIGHTS")
    if weights:
        (tmp_path / "weights").mkdir()
        (tmp_path / "weights" / Path(weights).name).symlink_to(Path(weights).resolve())
    app = create_app(tmp_path / "data", token="tok", weights_dir=tmp_path / "weights")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/?token=tok", Path(weights).name if weights else None
    server.should_exit = True
    thread.join(timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
def test_the_page_uploads_shows_the_image_forming_and_downloads_the_result(server, tmp_path):
    url, weights = server
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820}, accept_downloads=True)
            page.goto(url)
            page.wait_for_function("document.querySelector('#weights').options.length > 0")
            page.set_input_files("#content", str(SAMPLES / "content_tubingen.jpg"))
            page.set_input_files("#style", str(SAMPLES / "style_starry_night.jpg"))
            page.fill("#size", "64")
            page.fill("#steps", "60" if weights else "20")
            if weights:
                page.select_option("#backbone", "vgg16")
                page.select_option("#weights", weights)
                page.fill("#style-weight", "1e5")
            else:
                page.select_option("#weights", "random")
            page.click("#start")

            page.wait_for_function("Number(document.querySelector('#preview').dataset.step) > 0", timeout=120_000)
            seen = int(page.get_attribute("#preview", "data-step"))
            page.wait_for_function(
                f"Number(document.querySelector('#preview').dataset.step) > {seen}", timeout=120_000
            )  # the image changes while the run goes on
            page.wait_for_function("document.querySelector('#preview').naturalWidth == 64")  # it loads
            screenshot = os.environ.get("NST_SCREENSHOT")
            if screenshot:
                page.wait_for_function("Number(document.querySelector('#preview').dataset.step) >= 20", timeout=120_000)
                page.screenshot(path=str(tmp_path / "page.png"))
                Image.open(tmp_path / "page.png").convert("RGB").quantize(128).save(screenshot, optimize=True)
            assert "step" in page.inner_text("#stats")

            link = page.wait_for_selector("#gallery a.download", timeout=180_000)
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            assert max(Image.open(saved).size) == 64
            assert page.inner_text("#live-state") == "done"

            # "Run again" puts that job's images and settings back in the form.
            page.reload()
            page.wait_for_function("document.querySelector('#weights').options.length > 0")
            page.fill("#size", "512")
            page.click("#gallery .card button:has-text('Run again')")
            page.wait_for_function("document.querySelectorAll('#style-thumbs img').length == 1")
            assert page.input_value("#size") == "64" and page.locator("#content-thumbs img").count() == 1
        finally:
            browser.close()
