"""The web chat page at `/`: served as one self-contained HTML file, and chatting for real in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from zephyr.engine import Request
from zephyr.serve import ServeLimits, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(tiny_engine, start_server):
    server = start_server(create_app(tiny_engine, ServeLimits(), api_key="sekret"))
    yield server
    server.stop()


def test_page_is_self_contained_html(server):
    status, headers, page = server.request("GET", "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in headers["content-security-policy"]
    text = page.decode()
    assert "/v1/chat/completions" in text and "getReader" in text  # streams with fetch + ReadableStream
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), (
        "the page loads something from elsewhere"
    )


def test_page_chats_with_streaming_in_chromium(server, tiny_engine):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium) for the headless browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            sent = []
            page.on(
                "request",
                lambda r: (
                    sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None
                ),
            )
            page.goto(server.url + "/")
            # Selectors only: the page's CSP forbids eval, which wait_for_function relies on.
            page.wait_for_selector("#model:text-is('tiny')")

            # Without the key the server answers 401, and the page says so.
            page.fill("#message", "Hello!")
            page.click("#send")
            page.wait_for_selector("#error.shown")
            assert "API key" in page.text_content("#error")
            assert page.input_value("#message") == "Hello!"  # the turn is handed back to retry

            assert page.is_visible("#api-key")  # the 401 opened the settings
            page.fill("#api-key", "sekret")
            page.fill("#system", "Be brief.")
            page.eval_on_selector(
                "#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }"
            )
            page.fill("#max-tokens", "24")
            page.click("#send")
            page.wait_for_selector(".msg.assistant:not(.streaming)", state="attached")
            assert not page.is_visible("#error")
            answer = page.text_content(".msg.assistant .body")
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
            ids = tiny_engine.encode_chat(messages)
            expected = tiny_engine.run(
                [Request(ids, tiny_engine.sampling(temperature=0, max_new_tokens=24))]
            )[0]
            assert answer and answer == expected.text
            assert sent[-1]["messages"] == messages
            assert (sent[-1]["stream"], sent[-1]["temperature"], sent[-1]["max_tokens"]) == (True, 0, 24)

            page.click("#reset")
            assert page.locator(".msg").count() == 0
            page.reload()
            assert page.input_value("#api-key") == "sekret"  # kept in localStorage
        finally:
            browser.close()
