"""The Django course chat (examples/django_chat) in a real browser: Debian's Chromium driven by
Playwright, two daphne processes sharing one channelbus broker process.

A message typed on a page served by one daphne appears on the page of the same course served by
the other within 2 seconds; pages of another course see nothing of it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from consumer_helpers import processes  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "django_chat"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DELIVERY_SECONDS = 2.0
WAIT_SECONDS = 10.0  # how long to wait for a message at all; DELIVERY_SECONDS is then checked
LISTENING = r"Listening on TCP address 127\.0\.0\.1:(\d+)"

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"{CHROMIUM} is missing; install Debian's Chromium to run the browser test:"
        " `sudo apt-get install chromium` (CI does this in .ci/run)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is missing: pip install -e '.[test]' (no `playwright install` needed)",
)


def start_daphne(processes, broker_url: str, label: str):  # noqa: F811
    """A daphne process serving the chat site on a loopback port the OS picks; returns
    ``(process, base URL)`` once it listens."""
    env = {
        "CHANNELBUS_BROKER": broker_url,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)]),
    }
    daphne = shutil.which("daphne", path=os.path.dirname(sys.executable)) or "daphne"
    proc = processes(daphne, "-e", "tcp:port=0:interface=127.0.0.1", "chatsite.asgi:application",
                     env=env, name=f"daphne {label}")
    port = proc.expect(LISTENING, "stderr").group(1)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium context with a fresh profile; closed at teardown."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield context
        finally:
            context.close()


def open_room(browser, base: str, course: int, name: str):
    """A page in ``course``'s room as ``name``, returned once its WebSocket is open (the consumer
    accepts only after joining the room's group, so the page is then in the room)."""
    page = browser.new_page()
    page.goto(f"{base}/chat/room/{course}/?name={name}")
    page.wait_for_selector("body[data-connected='1']", timeout=10_000)
    return page


def say(page, text: str) -> int:
    """Type ``text`` and press the send button; return the browser's clock (ms) just before."""
    page.fill("#chat-message-input", text)
    sent = page.evaluate("Date.now()")
    page.click("#chat-message-submit")
    return sent


def delivery_seconds(page, text: str, sent: int) -> float:
    """Wait until ``text`` is in the page's message list; return the seconds from ``sent`` to
    when the page added it, by the browser's clock (Playwright's own polling not counted)."""
    item = page.locator("#chat .message", has_text=text).first
    item.wait_for(timeout=WAIT_SECONDS * 1000)
    return (int(item.get_attribute("data-received-at")) - sent) / 1000


def messages(page) -> list[tuple[str, str, str]]:
    """The page's message list as ``(user, date, text)``."""
    return page.eval_on_selector_all(
        "#chat .message",
        "items => items.map(m => [m.querySelector('strong').textContent,"
        " m.querySelector('.date').textContent.trim(), m.querySelector('.text').textContent])",
    )


def test_a_message_reaches_the_same_course_on_the_other_server_and_no_other_course(
        broker_process, processes, browser):  # noqa: F811
    _, server1 = start_daphne(processes, broker_process.url, "1")
    _, server2 = start_daphne(processes, broker_process.url, "2")

    alice = open_room(browser, server1, 1, "alice")
    bob = open_room(browser, server2, 1, "bob")
    carol = open_room(browser, server2, 2, "carol")  # another course, on the receiving server
    dave = open_room(browser, server1, 2, "dave")  # another course, on the sending server

    sent = say(alice, "hello from server one")
    assert delivery_seconds(bob, "hello from server one", sent) < DELIVERY_SECONDS
    assert delivery_seconds(alice, "hello from server one", sent) < DELIVERY_SECONDS  # an echo

    sent = say(bob, "hello back from server two")
    assert delivery_seconds(alice, "hello back from server two", sent) < DELIVERY_SECONDS

    # Course 2 talks; once its message went round, anything of course 1 would have arrived too.
    sent = say(carol, "course two only")
    assert delivery_seconds(dave, "course two only", sent) < DELIVERY_SECONDS
    delivery_seconds(carol, "course two only", sent)

    for page in (alice, bob):
        assert [(user, text) for user, _, text in messages(page)] == [
            ("alice", "hello from server one"), ("bob", "hello back from server two"),
        ]
    for page in (carol, dave):
        assert [(user, text) for user, _, text in messages(page)] == [("carol", "course two only")]
    assert all(date for page in (alice, bob, carol, dave) for _, date, _ in messages(page)), \
        "every message shows its timestamp"
