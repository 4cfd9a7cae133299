"""Chromium (headless, fake camera) runs the webcam page's WebRTC session against a real server.

Run by tests/test_webrtc.py under `unshare -n`, like webrtc_peer.py: a private veth pair, the server
and the browser all inside a network namespace of their own. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import time

import httpx
from playwright.sync_api import sync_playwright

from helpers import CHROMIUM_ARGS
from webrtc_peer import network, running_server

ARGS = [
    *CHROMIUM_ARGS,
    # Real host candidates instead of mDNS .local names, which the server could not resolve here.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


def main() -> None:
    port, log, screenshot = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    network()
    result: dict = {}
    with running_server(port, log), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{port}/webrtc.html")  # the server's own size (128), as no ?resolution= asks
        page.wait_for_function("document.querySelector('#status').dataset.state === 'ready'")
        page.wait_for_function("Number(document.querySelector('#remote').dataset.frames) >= 10")
        result["remote_size"] = page.evaluate("[document.querySelector('#remote').videoWidth, document.querySelector('#remote').videoHeight]")
        page.fill("#prompt", "a painting of a street")
        time.sleep(2.5)
        result["fps_text"] = page.inner_text("#stat-fps")
        result["frames"] = int(page.get_attribute("#remote", "data-frames"))
        result["errors_shown"] = page.locator("#errors li").count()
        result["stats"] = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10).json()["streaming"]
        page.screenshot(path=screenshot)
        result["page_errors"] = errors
        # Closing the tab gives the slot back without waiting for ICE to time out (28 s before).
        page.close()
        left = time.monotonic()
        while httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10).json()["sessions"] and time.monotonic() - left < 60:
            time.sleep(0.2)
        result["freed_after_s"] = round(time.monotonic() - left, 1)
        browser.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
