"""The web page at `/` in a real browser: headless Chromium from the system packages, driven by Playwright.

Without Chromium the test is skipped and says why; `.ci/run` installs Chromium and sets LDM_REQUIRE_BROWSER=1,
so there a missing browser fails the test instead of skipping it.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.server.app import ServerConfig, create_app
from tests.test_server import ThreadServer

ROOT = Path(__file__).resolve().parents[1]
# The screenshot a run leaves for a person to look at.
SCREENSHOT = ROOT / "outputs" / "test-artifacts" / "server-page.png"
USER, PASSWORD = "ann", "s3cret"


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no chromium on PATH (apt-get install chromium, as .ci/run does; or set CHROMIUM)"
        if os.environ.get("LDM_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_the_page_generates_shows_progress_and_reads_settings_back(random_ckpt):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServerConfig(checkpoint=random_ckpt, auth=(USER, PASSWORD))
    try:
        with ThreadServer(create_app(config)) as server, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable)
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1100, "height": 700})
            page = context.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#sampler_name option[value='DPM++ 2M']", state="attached")
            page.fill("#prompt", "a small (blue:1.2) square")
            for field, value in (("#steps", "120"), ("#width", "32"), ("#height", "32"), ("#seed", "7"),
                                 ("#batch_size", "2"), ("#cfg_scale", "3")):
                page.fill(field, value)
            page.select_option("#sampler_name", "DPM++ 2M")
            page.click("#generate")
            widths, deadline = set(), time.monotonic() + 120
            while page.locator("figure img").count() < 2:
                assert time.monotonic() < deadline, page.inner_text("#status")
                widths.add(page.eval_on_selector("#bar div", "bar => bar.style.width"))
                time.sleep(0.05)
            moving = {w for w in widths if w not in ("", "0%", "0.0%", "100.0%")}
            assert len(moving) >= 2, widths  # the bar moved through values between empty and full
            caption = page.inner_text("figure:nth-of-type(2) figcaption")
            assert caption.startswith("a small (blue:1.2) square\nSteps: 120, Sampler: DPM++ 2M, Schedule type: "
                                      "Karras, CFG scale: 3.0, Seed: 8, Size: 32x32")
            assert page.eval_on_selector("figure img", "img => img.naturalWidth") == 32
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))

            # A PNG from elsewhere dropped on the page: its infotext fills the form.
            info = PngInfo()
            info.add_text("parameters", "a green circle\nNegative prompt: red\nSteps: 33, Sampler: Euler a, "
                          "CFG scale: 5.5, Seed: 1234, Size: 48x40")
            buffer = io.BytesIO()
            Image.new("RGB", (48, 40)).save(buffer, format="PNG", pnginfo=info)
            transfer = page.evaluate_handle("""bytes => {
                const transfer = new DataTransfer();
                transfer.items.add(new File([new Uint8Array(bytes)], "a1111.png", {type: "image/png"}));
                return transfer; }""", list(buffer.getvalue()))
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            page.wait_for_function("document.getElementById('seed').value === '1234'")
            values = {f: page.input_value(f"#{f}") for f in ("prompt", "negative_prompt", "steps", "cfg_scale",
                                                               "width", "height", "sampler_name")}
            assert values == {"prompt": "a green circle", "negative_prompt": "red", "steps": "33", "cfg_scale": "5.5",
                              "width": "48", "height": "40", "sampler_name": "Euler a"}
            browser.close()
    finally:
        torch.set_num_threads(threads)
