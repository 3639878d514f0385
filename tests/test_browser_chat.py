"""The browser page (local/static/index.html) in headless Chromium, against the local
stack running the real Lambda: real pages, real WebSockets, real DOM."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from local import stack
from tests.local_harness import StackFactory, connect, wait_for

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Small enough that a typed message can go over it: the page must show the 413.
MAX_MESSAGE_BYTES = 200

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: `make browser` installs it (apt-get, as root or sudo)",
)

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def lambda_stack(stack_factory: StackFactory) -> stack.Stack:
    started, _ = stack_factory(
        handler="lambda_function.lambda_handler",
        env={"MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)},
    )
    return started


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh profile (Playwright's download is not used)."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 880, "height": 620},
            color_scheme="light",
        )
        yield context
        context.close()


@pytest.fixture
def room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


def open_page(
    browser: BrowserContext, local_stack: stack.Stack, room: str, query: str = ""
) -> Page:
    """The page as `make run` serves it, joined to `room` and open."""
    page = browser.new_page()
    page.goto(f"{local_stack.http_url}/?room={room}{query}")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    return page


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def connection_ids(local_stack: stack.Stack, room: str) -> set[str]:
    return {
        c["connectionId"] for c in local_stack.connections() if c["query"].get("room") == [room]
    }


def incoming(page: Page, text: str):
    return page.locator("#messages li.incoming", has_text=text)


def own(page: Page, text: str):
    return page.locator("#messages li.own", has_text=text)


def test_messages_reach_only_the_pages_in_the_senders_room(browser, lambda_stack):
    room = "lobby"  # the only test here in this room: its screenshot reads like the README's
    alice = open_page(browser, lambda_stack, room)
    bob = open_page(browser, lambda_stack, "kitchen")
    carol = open_page(browser, lambda_stack, room)

    send(alice, "Hello, room!")
    send(bob, "Anyone in here?")
    expect(own(alice, "Hello, room!").locator(".receipt")).to_contain_text("sent:")
    expect(own(bob, "Anyone in here?").locator(".receipt")).to_contain_text("sent:")
    send(carol, "Hi Alice, Carol here.")

    at_carol = incoming(carol, "Hello, room!")
    expect(at_carol).to_have_count(1)
    expect(at_carol.locator(".from")).to_have_text(re.compile(r"^\S{6}$"))
    expect(at_carol.locator(".room")).to_have_text(f"#{room}")
    expect(at_carol.locator(".latency")).to_have_text(re.compile(r"^-?\d+ ms$"))
    expect(incoming(alice, "Carol here")).to_have_count(1)
    expect(own(carol, "Carol here").locator(".receipt")).to_contain_text("sent:")
    # Every post of a broadcast is done before the sender's reply: nothing more is coming.
    expect(bob.locator("#messages li.incoming")).to_have_count(0)
    expect(incoming(alice, "Anyone in here?")).to_have_count(0)
    expect(incoming(carol, "Anyone in here?")).to_have_count(0)

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "chat.png"))
    for page in (alice, bob, carol):
        page.close()


def test_the_sender_sees_its_sent_counts(browser, lambda_stack, room):
    alice = open_page(browser, lambda_stack, room)
    bob = open_page(browser, lambda_stack, room)
    carol = open_page(browser, lambda_stack, room)

    send(alice, "counted")

    expect(own(alice, "counted").locator(".receipt")).to_have_text(
        "sent: recipients 2, delivered 2, stale 0, failed 0"
    )
    for page in (alice, bob, carol):
        page.close()


def test_a_refused_message_shows_the_servers_error(browser, lambda_stack, room):
    alice = open_page(browser, lambda_stack, room)

    send(alice, "x" * (MAX_MESSAGE_BYTES + 1))

    receipt = own(alice, "xxxx").locator(".receipt")
    expect(receipt).to_have_text(re.compile(r"^error 413: "))
    expect(receipt).to_have_class(re.compile(r"\bfailed\b"))
    alice.close()


def test_message_text_is_shown_as_text_never_as_html(browser, lambda_stack, room):
    alice = open_page(browser, lambda_stack, room)
    mallory = connect(f"{lambda_stack.ws_url}?room={room}")
    attack = '<img src=x onerror="window.pwned=1"><b>bold</b>'

    mallory.send(json.dumps({"action": "message", "messageBody": attack}))

    expect(incoming(alice, "bold").locator(".text")).to_have_text(attack)
    assert alice.locator("#messages img, #messages b").count() == 0
    assert alice.evaluate("window.pwned") is None
    mallory.close()
    alice.close()


def test_the_page_reconnects_after_its_connection_is_deleted_and_still_works(
    browser, lambda_stack, room
):
    alice = open_page(browser, lambda_stack, room)
    before = connection_ids(lambda_stack, room)
    carol = open_page(browser, lambda_stack, room)
    (carol_id,) = connection_ids(lambda_stack, room) - before

    lambda_stack.management_client().delete_connection(ConnectionId=carol_id)

    expect(carol.locator("#messages li.note", has_text="reconnecting in")).to_have_count(1)
    expect(carol.locator("#status")).to_have_attribute("data-state", "open")
    send(alice, "Still there, Carol?")
    expect(incoming(carol, "Still there, Carol?")).to_have_count(1)
    send(carol, "Yes, back again.")
    expect(own(carol, "back again").locator(".receipt")).to_have_text(
        "sent: recipients 1, delivered 1, stale 0, failed 0"
    )
    assert carol_id not in connection_ids(lambda_stack, room)
    alice.close()
    carol.close()


def test_an_idle_page_sends_keep_alive_pings(browser, lambda_stack, room):
    alice = open_page(browser, lambda_stack, room, "&ping=0.3")
    (alice_id,) = connection_ids(lambda_stack, room)

    wait_for(
        lambda: (
            sum(
                r["routeKey"] == "ping" and r.get("connectionId") == alice_id
                for r in lambda_stack.reports()
            )
            >= 3
        ),
        timeout=15,
        what="three keep-alive pings",
    )

    expect(alice.locator("#messages li", has_text="pong")).to_have_count(0)
    alice.close()


def test_the_page_loads_nothing_but_itself(browser, lambda_stack, room):
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    page.goto(f"{lambda_stack.http_url}/?room={room}")

    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    assert requested == [f"{lambda_stack.http_url}/?room={room}"]
    page.close()
