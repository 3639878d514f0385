"""`python -m local chat` end to end: real chat processes talking through pipes to the
local stack running the real Lambda, over real WebSockets."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from local import chat, stack
from tests.local_harness import StackFactory, connect, wait_for

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LAMBDA = "lambda_function.lambda_handler"
# `[room] sender text (latency)`, as the chat prints a message from someone else.
MESSAGE_LINE = re.compile(
    r"\[(?P<room>[^\]]+)\] (?P<sender>\S{6}) (?P<text>.*) \((?P<ms>-?\d+) ms\)"
)


class ChatProcess:
    """`python -m local chat` in a child process, its stdout and stderr collected line
    by line as they arrive."""

    def __init__(self, url: str, room: str | None, *extra: str) -> None:
        argv = [sys.executable, "-m", "local", "chat", "--url", url, *extra]
        if room is not None:
            argv += ["--room", room]
        self.process = subprocess.Popen(
            argv,
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._collectors = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))
        ]
        for collector in self._collectors:
            collector.start()

    @staticmethod
    def _collect(stream: io.TextIOBase, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait_out(self, predicate, what: str, timeout: float = 15.0) -> str:
        return wait_for(lambda: next((x for x in self.out if predicate(x)), None), timeout, what)

    def wait_err(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        wait_for(lambda: sum(text in x for x in self.err) >= count, timeout, f"{text!r} x{count}")

    def wait_connected(self, count: int = 1) -> None:
        self.wait_err("chat: connected to", count)

    def finish(self, timeout: float = 30.0) -> int:
        """Close its input (end of input) and wait for it to exit; its exit status."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.exit_code(timeout)

    def exit_code(self, timeout: float = 30.0) -> int:
        """Wait for it to exit on its own, and for its last lines; its exit status."""
        code = self.process.wait(timeout)
        for collector in self._collectors:
            collector.join(timeout)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def lambda_stack(stack_factory: StackFactory) -> stack.Stack:
    """The local stack hosting the real Lambda, shared by this module's tests."""
    started, _ = stack_factory(handler=LAMBDA)
    return started


@pytest.fixture
def chats() -> Iterator[list[ChatProcess]]:
    """Chat processes started by a test, killed if the test left them running."""
    started: list[ChatProcess] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


def start_chat(chats: list[ChatProcess], url: str, room: str | None, *extra: str) -> ChatProcess:
    process = ChatProcess(url, room, *extra)
    chats.append(process)
    return process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connection_ids(local_stack: stack.Stack, room: str) -> set[str]:
    return {
        c["connectionId"] for c in local_stack.connections() if c["query"].get("room") == [room]
    }


# --- Chatting ---------------------------------------------------------------------------


def test_two_clients_in_a_room_see_each_others_lines(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    bob = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()
    bob.wait_connected()

    alice.type("hello from alice")
    bob.type("hi alice, bob here")

    at_bob = MESSAGE_LINE.fullmatch(bob.wait_out(lambda x: "hello from alice" in x, "at bob"))
    at_alice = MESSAGE_LINE.fullmatch(alice.wait_out(lambda x: "bob here" in x, "at alice"))
    assert at_bob is not None and at_alice is not None
    assert at_bob["room"] == room and at_bob["text"] == "hello from alice"
    assert at_alice["room"] == room and at_alice["text"] == "hi alice, bob here"
    assert at_bob["sender"] != at_alice["sender"]
    assert int(at_bob["ms"]) >= 0 and int(at_alice["ms"]) >= 0
    assert alice.finish() == 0 and bob.finish() == 0


def test_the_sender_sees_its_sent_counts_undimmed_in_a_pipe(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    bob = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()
    bob.wait_connected()

    alice.type("counted")

    sent = alice.wait_out(lambda x: x.startswith("sent:"), "the sent reply")
    assert sent == "sent: recipients 1, delivered 1, stale 0, failed 0"
    assert alice.finish() == 0
    assert not any("\033" in line for line in alice.out + alice.err)


def test_a_client_in_another_room_sees_nothing(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    bob = start_chat(chats, lambda_stack.ws_url, room)
    carol = start_chat(chats, lambda_stack.ws_url, f"{room}-elsewhere")
    for process in (alice, bob, carol):
        process.wait_connected()

    alice.type("only for this room")
    bob.wait_out(lambda x: "only for this room" in x, "delivery to bob")
    # The sender's reply comes after every post of the broadcast: nothing more is coming.
    alice.wait_out(lambda x: x.startswith("sent:"), "the sent reply")

    assert carol.finish() == 0
    assert carol.out == []


def test_ping_prints_pong(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()

    alice.type("/ping")

    pong = alice.wait_out(lambda x: x.startswith("pong:"), "the pong")
    assert re.fullmatch(r"pong: \d+ ms round trip", pong)
    assert alice.finish() == 0


def test_piped_input_is_sent_and_answered_before_exit_0(lambda_stack, room):
    listener = connect(f"{lambda_stack.ws_url}?room={room}")

    result = subprocess.run(
        [sys.executable, "-m", "local", "chat", "--url", lambda_stack.ws_url, "--room", room],
        input="first\nsecond\n",
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "sent: recipients 1, delivered 1, stale 0, failed 0",
        "sent: recipients 1, delivered 1, stale 0, failed 0",
    ]
    bodies = {json.loads(listener.recv())["messageBody"] for _ in range(2)}
    assert bodies == {"first", "second"}
    listener.close()


def test_control_characters_from_the_room_are_shown_escaped(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()
    mallory = connect(f"{lambda_stack.ws_url}?room={room}")

    mallory.send(json.dumps({"action": "message", "messageBody": "\x1b[2J\rgotcha\u202e"}))

    line = alice.wait_out(lambda x: "gotcha" in x, "the message")
    assert "\x1b" not in line and "\r" not in line and "\u202e" not in line
    assert "\\x1b[2J\\rgotcha\\u202e" in line
    mallory.close()
    assert alice.finish() == 0


def test_a_body_that_is_not_a_string_prints_as_json(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()
    sender = connect(f"{lambda_stack.ws_url}?room={room}")

    sender.send(json.dumps({"action": "message", "messageBody": {"score": [1, 2]}}))

    line = alice.wait_out(lambda x: "score" in x, "the message")
    assert MESSAGE_LINE.fullmatch(line)["text"] == '{"score": [1, 2]}'
    sender.close()
    assert alice.finish() == 0


def test_a_line_over_the_frame_limit_is_fragmented_and_answered(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()

    alice.type("x" * 40_000)  # over the 32 KB frame limit, under the 128 KB message limit

    # The server got the whole message (and refused it for MAX_MESSAGE_BYTES) instead of
    # closing the connection with 1009 for an oversized frame.
    error = alice.wait_out(lambda x: x.startswith("error"), "the error reply")
    assert error.startswith("error 413:")
    assert alice.finish() == 0
    assert not any("connection closed" in line for line in alice.err)


# --- Connections that drop, and ones that never open ----------------------------------


def test_reconnects_after_the_connection_is_deleted_and_still_receives(lambda_stack, chats, room):
    alice = start_chat(chats, lambda_stack.ws_url, room)
    alice.wait_connected()
    (alice_id,) = connection_ids(lambda_stack, room)
    bob = start_chat(chats, lambda_stack.ws_url, room)
    bob.wait_connected()

    lambda_stack.management_client().delete_connection(ConnectionId=alice_id)

    alice.wait_err("connection closed (1000")
    alice.wait_connected(count=2)
    bob.type("are you back?")
    line = alice.wait_out(lambda x: "are you back?" in x, "delivery after reconnecting")
    assert MESSAGE_LINE.fullmatch(line)
    assert alice_id not in connection_ids(lambda_stack, room)
    assert alice.finish() == 0 and bob.finish() == 0


def test_lines_typed_before_the_server_is_up_are_sent_once_connected(stack_factory, chats, room):
    port = free_port()
    alice = start_chat(
        chats,
        f"ws://127.0.0.1:{port}/local",
        room,
        *("--connect-attempts", "100", "--max-backoff", "0.5"),
    )
    alice.type("written early")
    alice.wait_err("cannot connect")

    stack_factory(handler=LAMBDA, port=port)

    alice.wait_connected()
    sent = alice.wait_out(lambda x: x.startswith("sent:"), "the sent reply", timeout=30)
    assert sent.startswith("sent: recipients 0")
    assert alice.finish() == 0


def test_keep_alive_pings_hold_an_idle_connection_open(stack_factory, chats, room):
    short_idle, _ = stack_factory(handler=LAMBDA, idle_timeout=1.5)
    alice = start_chat(chats, short_idle.ws_url, room, "--ping-interval", "0.4")
    alice.wait_connected()

    wait_for(
        lambda: sum(r["routeKey"] == "ping" for r in short_idle.reports()) >= 5,
        timeout=20,
        what="keep-alive pings past the idle timeout",
    )

    assert not any("connection closed" in line for line in alice.err)
    assert alice.finish() == 0
    assert alice.out == []  # keep-alive pongs are not printed


class SilentServer:
    """Completes WebSocket handshakes, then never sends a byte: a peer that died
    without closing (a laptop that slept, a NAT that forgot the connection)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/local"
        self.held: list[socket.socket] = []  # open, and silent
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request)[1]
            # RFC 6455 fixes SHA-1 for Sec-WebSocket-Accept; it protects nothing here.
            accept = key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            digest = hashlib.sha1(accept, usedforsecurity=False).digest()
            connection.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + base64.b64encode(digest)
                + b"\r\n\r\n"
            )
            self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


def test_a_connection_that_goes_silent_is_reopened(monkeypatch):
    monkeypatch.setattr(chat, "PONG_TIMEOUT_SECONDS", 0.5)
    server = SilentServer()
    read_end, write_end = os.pipe()
    err = io.StringIO()
    options = chat.ChatOptions(url=server.url, ping_interval=0.2, max_backoff=0.2)
    with open(read_end) as stdin:
        ending = threading.Thread(
            target=chat.chat, args=(options, stdin, chat.Terminal(io.StringIO(), err))
        )
        ending.start()

        wait_for(lambda: len(server.held) >= 2, timeout=15, what="a second connection")

        os.close(write_end)
        ending.join(30)
    server.close()
    assert "chat: connection closed (timed out: no answer from the server)" in err.getvalue()


def test_a_bad_room_is_refused_with_the_http_status_and_exit_1(lambda_stack, chats):
    alice = start_chat(chats, lambda_stack.ws_url, "no spaces allowed")

    assert alice.exit_code() == 1
    assert any(
        "the server refused the connection: HTTP 400 Bad Request" in line
        and "1 to 64 characters" in line
        for line in alice.err
    )


def test_an_unreachable_url_fails_after_its_attempts_with_exit_1(chats):
    url = f"ws://127.0.0.1:{free_port()}/local"
    alice = start_chat(chats, url, "lobby", "--connect-attempts", "2")
    alice.type("never sent")

    assert alice.exit_code() == 1
    assert alice.err[-1] == (
        f"chat: cannot reach {url}?room=lobby: Connection refused (after 2 attempts)"
    )


def test_a_url_that_is_not_a_websocket_url_exits_2(chats):
    alice = start_chat(chats, "http://127.0.0.1:8080/", "lobby")

    assert alice.exit_code() == 2
    assert "is not a WebSocket URL" in alice.err[-1]


# --- Output -----------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_replies_are_dimmed_on_a_terminal_and_messages_are_not(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out, err = _Terminal(), _Terminal()
    terminal = chat.Terminal(out, err)

    terminal.say("sent: recipients 1, delivered 1, stale 0, failed 0", dim=True)
    terminal.say("[lobby] abcdef hi (3 ms)")

    assert out.getvalue().splitlines() == [
        "\033[2msent: recipients 1, delivered 1, stale 0, failed 0\033[0m",
        "[lobby] abcdef hi (3 ms)",
    ]


def test_a_token_is_masked_in_the_urls_the_chat_prints():
    url = chat.connection_url("wss://abc.example/prod", "lobby", "1700000000.c2VjcmV0")

    assert "c2VjcmV0" in url
    assert chat.redacted(url) == "wss://abc.example/prod?room=lobby&token=..."


def test_sent_counts_say_when_the_room_is_finished_elsewhere_or_was_too_big_to_read():
    counts = {"recipients": 9, "delivered": 4, "stale": 0, "failed": 5}
    assert chat.render_sent(counts) == "sent: recipients 9, delivered 4, stale 0, failed 5"
    assert chat.render_sent({**counts, "complete": False}).endswith(
        "failed 5 (the room was too big to read in time)"
    )
    assert chat.render_sent({**counts, "continued": True}).endswith(
        "failed 5 so far (another invocation is posting to the rest of the room)"
    )
