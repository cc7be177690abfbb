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


def jobs_of(page) -> list[dict]:
    """The server's jobs, newest first, as the page's own API call sees them."""
    return page.evaluate("api('/jobs')")


def shown_job(page) -> str | None:
    return page.get_attribute("#live", "data-job")


def no_broken_images(page) -> None:
    """Every image the page shows has loaded (no broken-image icon): the hidden ones aside."""
    broken = page.evaluate("""Array.from(document.images).filter((img) => img.offsetParent !== null
        && img.complete && img.naturalWidth === 0).map((img) => img.outerHTML)""")
    assert broken == [], broken


def no_sideways_scroll(page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
def test_the_page_uploads_shows_the_image_forming_and_downloads_the_result(server, tmp_path):
    url, weights = server
    content, style = SAMPLES / "content_tubingen.jpg", SAMPLES / "style_starry_night.jpg"
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820}, accept_downloads=True)
            page.on("filechooser", lambda chooser: None)  # choosers intercepted from the start, not from each wait
            page.goto(url)
            page.wait_for_function("document.querySelector('#weights').options.length > 0")
            no_broken_images(page)  # the empty preview is a placeholder, not a broken image

            # A mistake is one banner, wrapped inside the page, that goes once it is fixed.
            page.click("#start")
            assert "Pick a content image" in page.inner_text("#message")
            assert page.get_attribute("#content-drop", "aria-invalid") == "true"
            page.evaluate("say('a long error: ' + 'x'.repeat(600) + ' ' + '/a/b/'.repeat(80))")
            no_sideways_scroll(page)
            # Tab reaches each drop zone's file input, and Enter or Space opens the file chooser.
            page.focus("header a")
            for key, chosen in (("Enter", content), (" ", style)):
                page.keyboard.press("Tab")
                assert page.evaluate("document.activeElement.closest('.drop') !== null"), "Tab reaches the zone"
                with page.expect_file_chooser() as chooser:
                    page.keyboard.press(key)
                chooser.value.set_files(str(chosen))
                assert page.is_hidden("#message"), "the banner goes once the image is chosen"
            assert page.locator("#content-thumbs img").count() == 1 and page.locator("#style-thumbs img").count() == 1

            page.fill("#size", "64")
            page.fill("#steps", "60" if weights else "100")
            if weights:
                page.select_option("#weights", weights)
                page.select_option("#backbone", "vgg16")
                page.fill("#style-weight", "1e5")
            else:
                page.select_option("#weights", "random")
                page.fill("#style-weight", "")  # empty: the default, not 0
            page.click("#start")
            page.wait_for_function("document.querySelector('#live').dataset.job")
            first = shown_job(page)
            assert jobs_of(page)[0]["settings"]["model.style_weight"] == (1e5 if weights else 1e6)

            page.wait_for_function("Number(document.querySelector('#preview').dataset.step) > 0", timeout=120_000)
            seen = int(page.get_attribute("#preview", "data-step"))
            page.wait_for_function(
                f"Number(document.querySelector('#preview').dataset.step) > {seen}", timeout=120_000
            )  # the image changes while the run goes on
            page.wait_for_function("document.querySelector('#preview').naturalWidth == 64")  # it loads

            # A second job queues behind the first, which stays in the panel.
            page.fill("#steps", "400")
            page.click("#start")
            page.wait_for_function("document.querySelectorAll('#gallery .card').length == 2")
            second = jobs_of(page)[0]["id"]
            assert second != first and shown_job(page) == first
            # A reload keeps the settings, the images chosen and the running job in the panel.
            page.reload()
            page.wait_for_function("document.querySelectorAll('#style-thumbs img').length == 1")
            page.wait_for_function("document.querySelector('#weights').options.length > 0")  # then the fields
            assert page.input_value("#size") == "64" and page.input_value("#steps") == "400"
            assert page.locator("#content-thumbs img").count() == 1
            page.wait_for_function(f"document.querySelector('#live').dataset.job == '{first}'")
            screenshot = os.environ.get("NST_SCREENSHOT")
            if screenshot:
                page.wait_for_function("Number(document.querySelector('#preview').dataset.step) >= 20", timeout=120_000)
                page.screenshot(path=str(tmp_path / "page.png"))
                Image.open(tmp_path / "page.png").convert("RGB").quantize(128).save(screenshot, optimize=True)
            # The panel's figures come with the job's first event, a moment after the page names the job.
            page.wait_for_function("document.querySelector('#stats').textContent.startsWith('step ')")

            # The first one done, the panel follows the queue to the second.
            link = page.locator(f"#gallery .card[data-id='{first}'] a.download")  # found again at the click:
            link.wait_for(timeout=180_000)  # the gallery is redrawn while a job runs
            with page.expect_download() as download:
                link.click()
            assert download.value.suggested_filename == "content_tubingen-x-style_starry_night.png"
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            assert max(Image.open(saved).size) == 64
            page.wait_for_function(f"document.querySelector('#live').dataset.job == '{second}'", timeout=60_000)
            page.wait_for_function("Number(document.querySelector('#preview').dataset.step) > 0", timeout=120_000)
            page.click("#cancel")
            page.wait_for_function("document.querySelector('#live-state').textContent == 'cancelled'", timeout=60_000)
            # A cancelled job's last image can be downloaded, named after its images.
            link = page.locator(f"#gallery .card[data-id='{second}'] a.download")
            link.wait_for(timeout=30_000)
            with page.expect_download() as download:
                link.click()
            assert download.value.suggested_filename == "content_tubingen-x-style_starry_night-partial.png"
            page.wait_for_timeout(500)
            no_broken_images(page)
            no_sideways_scroll(page)

            # "Run again" puts that job's images and settings back in the form.
            page.reload()
            page.wait_for_function("document.querySelector('#weights').options.length > 0")
            page.fill("#size", "512")
            page.click(f"#gallery .card[data-id='{first}'] button:has-text('Run again')")
            page.wait_for_function("document.querySelector('#size').value == '64'")
            page.wait_for_function("document.querySelectorAll('#content-thumbs img').length == 1")  # fetched after

            # The API link works offline: the routes, read from /openapi.json.
            page.click("header a:has-text('API')")
            page.wait_for_function("document.querySelectorAll('#routes tbody tr').length > 5")
            assert "/api/jobs/{job_id}/result" in page.inner_text("#routes")
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
def test_the_watch_page_of_a_command_line_run_follows_it_to_the_end(tmp_path):
    """``--watch`` (issue 24): the web app's page, form and queue hidden, shows the command's steps and image as
    they come and its end; nothing on it can start or change a run."""
    from tests.conftest import make_image
    from tests.test_watch import TINY, start

    make_image(tmp_path / "photo.png", 40, 30, seed=1)
    make_image(tmp_path / "painting.jpg", 32, 32, seed=2)
    run, _, url = start(tmp_path, "photo.png", "painting.jpg", "-o", "out.png", "--steps", "60", *TINY, "--watch", "0")
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 820})
                page.goto(url)
                page.wait_for_function(
                    "/step [1-9]/.test(document.querySelector('#stats').textContent)", timeout=120_000
                )  # the command imports torch and builds its model first
                assert not page.is_visible("#start") and not page.is_visible("#cancel")
                assert "Command-line run" in page.inner_text("#live h2")
                page.wait_for_function("document.querySelector('#live-state').textContent === 'done'", timeout=90_000)
                page.wait_for_function("document.querySelector('#preview').naturalWidth > 0")
                no_broken_images(page)
                no_sideways_scroll(page)
            finally:
                browser.close()
        assert run.wait(timeout=60) == 0 and (tmp_path / "out.png").exists()
    finally:
        run.kill()
