"""The web page at ``/`` in a real browser: Debian's Chromium driven by Playwright, against a
real ``chatd serve --demo`` process (its fake model in-process, steered by ``[[fake-llm]]``
markers) on a real PostgreSQL.

The browser runs in a thread (Playwright's sync API) while trio keeps reading the server's
output. Every wait is on a condition of the page (``expect``, ``wait_for_function``), never a
fixed sleep. Screenshots go to a temporary folder, or to ``$PAGE_SCREENSHOT_DIR`` (the committed
ones in docs/screenshots are made with ``PAGE_SCREENSHOT_DIR=docs/screenshots``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from playwright.sync_api import Page, WebSocket, expect, sync_playwright

from chatd.providers.fake import DEMO_REPLY
from tests.e2e.chatd_process import chatd_server

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 20_000

pytestmark = pytest.mark.slow

# Long enough to reload and to drop the connection mid-answer: 32 chunks, one every 120 ms.
STORY = (
    "Once upon a time a chat engine streamed its answers token by token, and every reader "
    "saw each word exactly once, whatever happened to their connection on the way."
)
SECOND = (
    "A dropped connection resumes from the cursor of the last event the page holds, so the "
    "answer goes on where it stopped without a single repeated word in between."
)
TOOL_REPLY = "It is 21 degrees in Paris."
WEATHER_TOOL = [
    {
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def marker(**knobs: Any) -> str:
    return f"[[fake-llm {json.dumps(knobs)}]]"


def slow(reply: str) -> str:
    return marker(reply=reply, chunks=32, chunk_interval_ms=120)


def _screenshot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("PAGE_SCREENSHOT_DIR") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


async def test_page_signs_in_streams_resumes_and_answers_tools(
    database_url: str, home: Path, tmp_path: Path
) -> None:
    args = ["--demo", "--home", str(home), "--database-url", database_url, "--port", "0"]
    args += ["--admin-token-file", str(home / "admin-token")]
    shots = _screenshot_dir(tmp_path)
    async with chatd_server(args) as server:
        assert server.admin_token is not None
        await trio.to_thread.run_sync(drive_browser, server.url, server.admin_token, shots)
    assert not any("Traceback" in line for line in server.output), "\n".join(server.output)


async def test_page_is_served_with_a_strict_content_security_policy(
    database_url: str, home: Path
) -> None:
    args = ["--database-url", database_url, "--port", "0"]
    async with chatd_server(args) as server, httpx2.AsyncClient(base_url=server.url) as client:
        page = await client.get("/")
        script = await client.get("/static/app.js")
        missing = await client.get("/static/nope.js")
        again = await client.get("/", headers={"If-None-Match": page.headers["ETag"]})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert '<script src="/static/app.js"' in page.text
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert again.status_code == 304


def drive_browser(url: str, token: str, shots: Path) -> None:
    assert Path(CHROMIUM).exists(), "no Debian chromium: run scripts/ensure-chromium.sh"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox"]
        )
        try:
            context = browser.new_context(viewport={"width": 1120, "height": 640})
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            failures: list[str] = []
            page.on("pageerror", lambda error: failures.append(str(error)))
            streams: list[WebSocket] = []
            page.on("websocket", lambda ws: streams.append(ws) if "/stream" in ws.url else None)
            page.on("dialog", lambda dialog: dialog.accept())

            sign_in(page, url, token, shots)
            chat_url = create_and_stream(page)
            reload_mid_answer(page, chat_url)
            drop_mid_answer_and_queue(page, streams, shots)
            edit_a_message(page)
            interrupt_an_answer(page)
            answer_a_dynamic_tool(page, shots)
            inbox_archive_and_delete(page)
            assert failures == [], failures
        finally:
            browser.close()


def sign_in(page: Page, url: str, token: str, shots: Path) -> None:
    page.goto(url)
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#signin-token", "chatd_not-a-token")
    page.click("#signin-form button")
    expect(page.locator("#signin-error")).to_have_text("That token is unknown or revoked.")
    page.fill("#signin-token", token)
    page.screenshot(path=shots / "signin.png")
    page.click("#signin-form button")
    expect(page.locator("#me-name")).to_have_text("admin (admin)")
    # The token is kept: a reload stays signed in.
    page.reload()
    expect(page.locator("#me-name")).to_have_text("admin (admin)")
    expect(page.locator("#watch-state")).to_have_attribute("data-state", "open")


def create_and_stream(page: Page) -> str:
    page.click("#new-chat-button")
    option = page.locator("#new-model option")
    expect(option).to_have_count(1)
    expect(option).to_have_text("demo-fake (chatd-fake) — default")
    page.fill("#new-title", "A first chat")
    page.fill("#new-text", "Hello! Who are you?")
    page.click("#new-chat-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"#/chats/[0-9a-f-]{36}$"))
    # The chat list got it, live, with its status.
    item = page.locator("#chat-list .chat-item", has_text="A first chat")
    expect(item.locator(".status")).to_have_attribute("data-status", "running")
    # Tokens stream: the preview grows through partial prefixes of the demo's answer.
    first = wait_for_partial(page, DEMO_REPLY, min_chars=1)
    wait_for_partial(page, DEMO_REPLY, min_chars=len(first) + 1)
    expect(page.locator("#messages .msg.assistant .text")).to_have_text(DEMO_REPLY)
    expect(item.locator(".status")).to_have_attribute("data-status", "waiting")
    return page.url


def reload_mid_answer(page: Page, chat_url: str) -> None:
    send(page, f"{slow(STORY)} Tell me a story.")
    wait_for_partial(page, STORY, min_chars=20)
    page.reload()
    assert page.url == chat_url
    # The stream replays the chat once: the answer so far, then the rest; never twice.
    page.wait_for_function(
        "() => document.querySelector('#preview .text, #messages .msg.assistant') !== null"
    )
    shown = preview_text(page)
    assert STORY.startswith(shown), shown
    answers = page.locator("#messages .msg.assistant .text")
    expect(answers).to_have_text([DEMO_REPLY, STORY])
    expect(page.locator("#messages .msg")).to_have_count(4)
    expect(page.locator("#chat-status")).to_have_attribute("data-status", "waiting")
    expect(page.locator("#chat-list .chat-item .status").first).to_have_attribute(
        "data-status", "waiting"
    )


def drop_mid_answer_and_queue(page: Page, streams: list[WebSocket], shots: Path) -> None:
    opened = len(streams)
    send(page, f"{slow(SECOND)} And then?")
    wait_for_partial(page, SECOND, min_chars=20)
    expect(page.locator("#send-button")).to_have_text("Queue")
    # Sent while the chat runs: queued, shown, then run after the answer.
    send(page, f"{marker(reply='Queued answer.')} One more.")
    expect(page.locator("#queue .queued")).to_have_count(1)
    page.screenshot(path=shots / "chat.png")
    # The connection drops mid-answer: the page reconnects with its cursor.
    page.evaluate("window.chatdPage.dropStream()")
    page.wait_for_function("() => document.querySelectorAll('#messages .msg').length >= 6")
    assert len(streams) == opened + 1, [ws.url for ws in streams]
    # It reconnected from its cursor: the messages it holds and the last part of the answer.
    cursor = r"message_seq=\d+&history_version=\d+&generation_attempt=\d+&part_seq=\d+"
    assert re.search(cursor, streams[-1].url), streams[-1].url
    answers = page.locator("#messages .msg.assistant .text")
    expect(answers).to_have_text([DEMO_REPLY, STORY, SECOND, "Queued answer."])
    expect(page.locator("#queue .queued")).to_have_count(0)
    expect(page.locator("#chat-status")).to_have_attribute("data-status", "waiting")


def edit_a_message(page: Page) -> None:
    last_user = page.locator("#messages .msg.user").last
    last_user.locator("button.edit").click()
    page.fill(".edit-form textarea", f"{marker(reply='Edited answer.')} One more, edited.")
    page.click(".edit-form button[type=submit]")
    expect(page.locator("#messages .msg.assistant .text")).to_have_text(
        [DEMO_REPLY, STORY, SECOND, "Edited answer."]
    )
    expect(page.locator("#messages .msg.user").last).to_contain_text("One more, edited.")
    expect(page.locator("#messages .msg")).to_have_count(8)


def interrupt_an_answer(page: Page) -> None:
    send(page, f"{slow(STORY)} Once more, please.")
    wait_for_partial(page, STORY, min_chars=10)
    page.click("#interrupt-button")
    expect(page.locator("#chat-status")).to_have_attribute("data-status", "waiting")
    expect(page.locator("#interrupt-button")).to_be_hidden()
    # What streamed before the interrupt is kept as the answer: a part of the story.
    expect(page.locator("#messages .msg")).to_have_count(10)
    kept = page.locator("#messages .msg.assistant .text").last.text_content() or ""
    assert kept, "the interrupted answer kept nothing"
    assert STORY.startswith(kept), kept
    assert kept != STORY, "the answer was not interrupted"


def answer_a_dynamic_tool(page: Page, shots: Path) -> None:
    page.click("#new-chat-button")
    expect(page.locator("#new-model option")).to_have_count(1)
    page.fill("#new-title", "Weather")
    page.click("#new-chat-form summary")
    page.fill("#new-tools", json.dumps(WEATHER_TOOL))
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    page.fill("#new-text", f"{marker(tool_calls=[call])} What is the weather in Paris?")
    page.click("#new-chat-form button[type=submit]")
    form = page.locator("#action-form")
    expect(form).to_be_visible()
    expect(page.locator("#chat-status")).to_have_attribute("data-status", "requires_action")
    calls = page.locator("#action-calls .action-call")
    expect(calls).to_have_count(1)
    expect(calls).to_have_attribute("data-tool-name", "get_weather")
    expect(calls.locator(".args")).to_have_text('{"city":"Paris"}')
    # The model's call is in the transcript too, as it happened.
    expect(page.locator("#messages .msg.assistant .tool-call")).to_contain_text("get_weather(")
    calls.locator("textarea").fill("not json")
    page.click("#action-form button[type=submit]")
    expect(page.locator("#action-error")).to_have_text("the result of get_weather must be JSON")
    calls.locator("textarea").fill('{"temperature_c": 21}')
    page.screenshot(path=shots / "dynamic-tool.png")
    page.click("#action-form button[type=submit]")
    expect(form).to_be_hidden()
    expect(page.locator("#messages .msg.tool .tool-result")).to_have_text(
        'get_weather →{"temperature_c": 21}'
    )
    expect(page.locator("#chat-status")).to_have_attribute("data-status", "waiting")
    expect(page.locator("#messages .msg.assistant").last.locator(".text")).not_to_be_empty()


def inbox_archive_and_delete(page: Page) -> None:
    # Each finished turn left a notification: three answers, a tool call, the answer after it.
    badge = page.locator("#inbox-count")
    expect(badge).to_be_visible()
    page.click("#inbox-button")
    expect(page.locator("#inbox-list .note.unread").first).to_be_visible()
    page.click("#mark-all-read")
    expect(badge).to_be_hidden()
    expect(page.locator("#inbox-list .note.unread")).to_have_count(0)

    chats = page.locator("#chat-list .chat-item")
    expect(chats).to_have_count(2)
    chats.filter(has_text="Weather").locator("a").click()
    expect(page.locator("#chat-title")).to_have_text("Weather")
    page.click("#archive-button")
    expect(chats).to_have_count(1)  # the list shows chats that are not archived
    page.check("#show-archived")
    expect(chats).to_have_text(re.compile("Weather"))
    page.uncheck("#show-archived")
    expect(chats).to_have_text(re.compile("A first chat"))
    chats.locator("a").click()
    expect(page.locator("#chat-title")).to_have_text("A first chat")
    page.click("#delete-button")  # confirmed by the dialog handler
    expect(chats).to_have_count(0)
    expect(page.locator("#welcome")).to_be_visible()


def send(page: Page, text: str) -> None:
    page.fill("#composer-text", text)
    page.press("#composer-text", "Enter")
    expect(page.locator("#composer-text")).to_have_value("")


def preview_text(page: Page) -> str:
    text: str = page.evaluate("() => document.querySelector('#preview .text')?.textContent ?? ''")
    return text


def wait_for_partial(page: Page, answer: str, min_chars: int) -> str:
    """Wait until the preview shows at least ``min_chars`` of ``answer`` but not all of it,
    and return it; fail at once if it is ever not a prefix of the answer (a repeat)."""
    handle = page.wait_for_function(
        """([answer, min]) => {
            const node = document.querySelector('#preview .text');
            const text = node ? node.textContent : '';
            if (!answer.startsWith(text)) return {bad: text};
            return text.length >= min && text.length < answer.length ? {ok: text} : null;
        }""",
        arg=[answer, min_chars],
    )
    result = handle.json_value()
    assert "bad" not in result, f"the preview is not a prefix of the answer: {result['bad']!r}"
    text: str = result["ok"]
    return text
