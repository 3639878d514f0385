"""`python -m local chat`: chat in a room from a terminal, or from a script.

    python -m local chat --url ws://127.0.0.1:8080/local --room lobby
    printf 'hello\\n' | python -m local chat --url wss://abc123.execute-api.eu-west-1.amazonaws.com/prod

Each line read from stdin is sent to the room as a `message`; `/ping` asks the
server for a `pong`, `/quit` (or end of input) leaves once the last replies are
in. What the room says goes to stdout, one line per frame; what the connection
does (connected, closed, reconnecting) goes to stderr, so stdout stays a clean
transcript of the chat.

It keeps a chat going where API Gateway would end it: a `ping` goes out before
the 10-minute idle timeout, a connection that drops (idle, the 2-hour limit, a
deployment, a DeleteConnection) is reopened with capped, jittered backoff, and
lines typed meanwhile wait in an outbox instead of being lost. A handshake the
server refuses (HTTP 4xx: a bad room name, a missing token) is not retried: it
ends the chat with the status and exit code 1.

Threads: the main thread waits for the end; one daemon thread reads stdin, one
owns the connection (connect, receive, reconnect), one sends keep-alive pings.
Every send happens under the session's lock, so frames never interleave.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import websocket

DEFAULT_URL = "ws://127.0.0.1:8080/local"
DEFAULT_ROOM = "lobby"

# API Gateway's limits on what a client sends: a frame of at most 32 KB, a message
# (one frame, or several continuation frames) of at most 128 KB. A longer line is
# split into frames rather than having the connection closed with 1009.
FRAME_LIMIT = 32 * 1024
MESSAGE_LIMIT = 128 * 1024

# Reconnect delays: full jitter over an exponential ceiling, so that clients dropped
# together (a deployment, a restart) do not all come back in the same instant.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
HANDSHAKE_TIMEOUT_SECONDS = 10.0
# A connection that lasted this long was healthy: the next reconnect starts the backoff over.
STABLE_CONNECTION_SECONDS = 10.0
# A keep-alive ping unanswered this long means the connection is dead without
# having said so (a laptop that slept, a NAT that forgot us): drop it and reconnect.
# Socket reads and writes are bounded by ping interval + this, so none hangs forever.
PONG_TIMEOUT_SECONDS = 30.0

# Handshake statuses worth retrying: throttled, or the server side failing.
RETRYABLE_STATUSES = {429, 500, 502, 503, 504}
HANDSHAKE_HINTS = {
    400: "a room name is 1 to 64 characters of A-Z a-z 0-9 _ . -",
    401: "this API needs a room token: --token TOKEN",
    403: "check the stage in the URL, and that the token is for this room",
}

# What a dropped connection raises, from the socket or from websocket-client.
SOCKET_ERRORS = (OSError, websocket.WebSocketException)

HELP = "type a line and press Enter to send it; /ping, /quit (or Ctrl-D); //text sends /text"


# --- Options ---------------------------------------------------------------------------


@dataclass
class ChatOptions:
    url: str = DEFAULT_URL
    room: str | None = DEFAULT_ROOM
    token: str | None = None
    ping_interval: float = 300.0  # seconds without data before a keep-alive ping
    connect_attempts: int = 4  # at start; after a drop it retries until told to stop
    max_backoff: float = BACKOFF_CAP_SECONDS  # the longest wait between reconnect attempts
    linger: float = 5.0  # seconds to wait for the last replies once input ends


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--url",
        default=DEFAULT_URL,
        help="the WebSocket URL, ws:// or wss:// (default: %(default)s)",
    )
    add("--room", default=DEFAULT_ROOM, help="the room to join (default: %(default)s)")
    add("--token", default=None, help="room token, for an API with AUTH_MODE=token")
    add(
        "--ping-interval",
        type=_positive,
        default=300.0,
        help="seconds without data before a keep-alive ping; API Gateway closes "
        "idle connections at 10 minutes (default: %(default)s)",
    )
    add(
        "--connect-attempts",
        type=int,
        default=4,
        help="attempts to reach the URL at start before giving up (default: %(default)s)",
    )
    add(
        "--max-backoff",
        type=_positive,
        default=BACKOFF_CAP_SECONDS,
        help="longest wait in seconds between reconnect attempts (default: %(default)s)",
    )
    add(
        "--linger",
        type=_positive,
        default=5.0,
        help="seconds to wait for the last replies once input ends (default: %(default)s)",
    )


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def connection_url(url: str, room: str | None, token: str | None) -> str:
    """`url` with ?room= and ?token= set (replacing any already in it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(
            f"{url!r} is not a WebSocket URL: use ws://HOST/STAGE or wss://HOST/STAGE, "
            f"e.g. {DEFAULT_URL}"
        )
    query = [
        (key, value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not (key == "room" and room is not None) and not (key == "token" and token is not None)
    ]
    if room is not None:
        query.append(("room", room))
    if token is not None:
        query.append(("token", token))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def redacted(url: str) -> str:
    """The URL fit to print: a token in it is a credential."""
    parts = urllib.parse.urlsplit(url)
    query = [
        (key, "..." if key == "token" else value)
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, safe=".")))


# --- Rendering what arrives -----------------------------------------------------------

# Characters another member of the room could use to rewrite our terminal (escape
# sequences, carriage returns) or to reorder text on screen (bidi overrides).
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` with control characters shown as escapes, never executed by the terminal."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS
        else ch
        for ch in text
    )


def short_id(connection_id: str) -> str:
    """Enough of a connection id to tell the people in a room apart."""
    return connection_id[:6]


def body_text(body: Any) -> str:
    """A message body as one line: a string as it is, any other JSON value as JSON."""
    return body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)


def render_message(frame: dict[str, Any], now_ms: int) -> str:
    """`[room] sender text (latency)`: latency is now minus API Gateway's receive time."""
    sent_at = frame.get("sentAt")
    latency = f" ({now_ms - sent_at} ms)" if isinstance(sent_at, int) else ""
    room = printable(str(frame.get("room", "?")))
    sender = printable(short_id(str(frame.get("from", "?"))))
    return f"[{room}] {sender} {printable(body_text(frame.get('messageBody')))}{latency}"


def render_sent(frame: dict[str, Any]) -> str:
    counts = ", ".join(
        f"{name} {frame.get(name, '?')}" for name in ("recipients", "delivered", "stale", "failed")
    )
    if frame.get("continued"):
        return f"sent: {counts} so far (another invocation is posting to the rest of the room)"
    unread = "" if frame.get("complete", True) else " (the room was too big to read in time)"
    return f"sent: {counts}{unread}"


def render_error(frame: dict[str, Any]) -> str:
    return printable(f"error {frame.get('status', '?')}: {frame.get('error', '')}")


def render_gateway_error(frame: dict[str, Any]) -> str:
    """API Gateway's own error frames: {"message": "Internal server error", ...}."""
    return printable(f"error: {frame['message']} (requestId {frame.get('requestId', '?')})")


# --- Output ---------------------------------------------------------------------------


class Terminal:
    """Where lines go: chat to stdout, connection status to stderr, dimmed (ANSI)
    only on a terminal and only without NO_COLOR. One lock, so lines never mix."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self._lock = threading.Lock()
        no_color = bool(os.environ.get("NO_COLOR"))
        self._dim_out = not no_color and out.isatty()
        self._dim_err = not no_color and err.isatty()

    def say(self, line: str, dim: bool = False) -> None:
        self._write(self.out, line, dim and self._dim_out)

    def status(self, line: str) -> None:
        self._write(self.err, f"chat: {line}", self._dim_err)

    def _write(self, stream: TextIO, line: str, dim: bool) -> None:
        text = f"\033[2m{line}\033[0m" if dim else line
        with self._lock:
            stream.write(text + "\n")
            stream.flush()


# --- The session ----------------------------------------------------------------------


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP status that retrying won't change."""


@dataclass
class Session:
    """One chat: the current socket, what waits to be sent, what waits for a reply."""

    options: ChatOptions
    terminal: Terminal
    url: str
    lock: threading.Condition = field(default_factory=threading.Condition)
    ws: websocket.WebSocket | None = None
    ever_connected: bool = False
    outbox: deque[tuple[str, str]] = field(default_factory=deque)  # (action, frame) to send
    replies_due: int = 0  # messages sent on this connection, not yet answered
    pings: deque[tuple[bool, float]] = field(default_factory=deque)  # (asked by the user, sent at)
    last_data: float = field(default_factory=time.monotonic)
    fatal: str | None = None  # why the chat cannot go on
    input_done: bool = False  # end of input or /quit
    stopping: bool = False

    # --- Sending (any thread) ---

    def submit(self, action: str, frame: dict[str, Any]) -> None:
        """Send a frame now if connected, else keep it for the next connection."""
        with self.lock:
            self.outbox.append((action, encode_frame(action, frame)))
            self._flush()

    def _flush(self) -> None:
        """Send the outbox in order; a frame leaves it only once it is sent. Lock held."""
        while self.outbox and self.ws is not None:
            action, frame = self.outbox[0]
            try:
                send_text(self.ws, frame)
            except SOCKET_ERRORS:
                return  # the receiving thread sees the drop and reconnects
            self.outbox.popleft()
            self.last_data = time.monotonic()
            if action == "ping":
                self.pings.append((True, self.last_data))
            else:
                self.replies_due += 1
        self.lock.notify_all()

    def keep_alive(self) -> None:
        """Ping when nothing has moved for `ping_interval`. (If no answer comes, the
        socket's timeout ends the connection and it is reopened.) Lock held."""
        now = time.monotonic()
        if self.ws is None:
            return
        if now - self.last_data >= self.options.ping_interval and not self.pings:
            try:
                send_text(self.ws, encode_frame("ping", {}))
            except SOCKET_ERRORS:
                return
            self.last_data = now
            self.pings.append((False, now))

    # --- Receiving (the connection thread) ---

    def on_frame(self, text: str) -> None:
        now_ms = int(time.time() * 1000)
        with self.lock:
            self.last_data = time.monotonic()
            try:
                frame = json.loads(text)
            except ValueError:
                frame = None
            if not isinstance(frame, dict):
                self.terminal.say(f"server: {printable(text)}", dim=True)
                return
            action = frame.get("action")
            if action == "message":
                self.terminal.say(render_message(frame, now_ms))
            elif action == "sent":
                self._answered()
                self.terminal.say(render_sent(frame), dim=True)
            elif action == "error":
                self._answered()
                self.terminal.say(render_error(frame), dim=True)
            elif action == "pong":
                asked, sent_at = self.pings.popleft() if self.pings else (True, time.monotonic())
                if asked:
                    round_trip = (time.monotonic() - sent_at) * 1000
                    self.terminal.say(f"pong: {round_trip:.0f} ms round trip", dim=True)
            elif action is None and "message" in frame:
                self._answered()
                self.terminal.say(render_gateway_error(frame), dim=True)
            else:
                self.terminal.say(f"server: {printable(text)}", dim=True)
            self.lock.notify_all()

    def _answered(self) -> None:
        self.replies_due = max(0, self.replies_due - 1)

    # --- Waiting (the main thread) ---

    def settled(self) -> bool:
        """Nothing left to send and every sent message answered. Lock held."""
        return not self.outbox and self.replies_due == 0 and not any(a for a, _ in self.pings)

    def stop(self, timeout: float = 2.0) -> None:
        """Close the connection cleanly (1000), so the server runs its $disconnect now."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
            if self.ws is None:
                return
            # The socket may be gone already; the connection thread has reported that.
            with contextlib.suppress(*SOCKET_ERRORS):
                self.ws.send_close()
            # The connection thread reads the server's close frame and lets go of the socket.
            if not self.lock.wait_for(lambda: self.ws is None, timeout=timeout):
                self.ws.shutdown()


def encode_frame(action: str, fields: dict[str, Any]) -> str:
    """A frame as API Gateway will route it: compact JSON, UTF-8 left unescaped."""
    return json.dumps({"action": action, **fields}, ensure_ascii=False, separators=(",", ":"))


def send_text(ws: websocket.WebSocket, text: str) -> None:
    """One text message, split into continuation frames past API Gateway's frame limit."""
    data = text.encode()
    if len(data) <= FRAME_LIMIT:
        ws.send(data, websocket.ABNF.OPCODE_TEXT)
        return
    chunks = [data[i : i + FRAME_LIMIT] for i in range(0, len(data), FRAME_LIMIT)]
    for index, chunk in enumerate(chunks):
        opcode = websocket.ABNF.OPCODE_TEXT if index == 0 else websocket.ABNF.OPCODE_CONT
        fin = 1 if index == len(chunks) - 1 else 0
        ws.send_frame(websocket.ABNF.create_frame(chunk, opcode, fin))


def backoff_delay(attempt: int, cap: float = BACKOFF_CAP_SECONDS) -> float:
    """Seconds before reconnect attempt `attempt` (0, 1, ...): full jitter, capped."""
    ceiling = min(cap, BACKOFF_BASE_SECONDS * 2**attempt)
    return random.uniform(0, ceiling)  # noqa: S311 - spreading retries, not security


def open_socket(url: str, silence_limit: float) -> websocket.WebSocket:
    """A connected socket, or HandshakeRefused / OSError / WebSocketException. Once
    open, a read or write that waits `silence_limit` seconds fails: a live connection
    answers a keep-alive ping long before."""
    try:
        ws = websocket.create_connection(url, timeout=HANDSHAKE_TIMEOUT_SECONDS)
    except websocket.WebSocketBadStatusException as error:
        status = error.status_code
        if status in RETRYABLE_STATUSES:
            raise
        reason = f"HTTP {status} {error.status_message or ''}".rstrip()
        hint = HANDSHAKE_HINTS.get(status)
        if hint is None and status < 400:
            hint = "not a WebSocket API: the URL's path is the stage, e.g. ws://HOST/local"
        raise HandshakeRefused(f"{reason} ({hint})" if hint else reason) from error
    ws.settimeout(silence_limit)
    return ws


def describe_error(error: BaseException) -> str:
    if isinstance(error, websocket.WebSocketTimeoutException):
        return "timed out: no answer from the server"
    if isinstance(error, websocket.WebSocketBadStatusException):
        return f"HTTP {error.status_code} {error.status_message or ''}".rstrip()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def receive_until_closed(session: Session, ws: websocket.WebSocket) -> str:
    """Hand every text frame to the session until the connection ends; how it ended."""
    while True:
        try:
            opcode, frame = ws.recv_data_frame()
        except SOCKET_ERRORS as error:
            return describe_error(error)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            if len(data) >= 2:
                code = int.from_bytes(data[:2], "big")
                reason = data[2:].decode(errors="replace")
                return f"{code} {reason}".rstrip()
            return "closed without a status"
        if opcode == websocket.ABNF.OPCODE_TEXT:
            session.on_frame(frame.data.decode(errors="replace"))


def run_connection(session: Session) -> None:
    """Connect, receive until the connection ends, reconnect; until stopped or fatal.
    An unexpected error ends the chat with its message rather than leaving it hanging."""
    try:
        connect_and_reconnect(session)
    except Exception as error:  # reported to the user, then the chat ends
        with session.lock:
            session.fatal = f"unexpected error: {type(error).__name__}: {error}"
            session.lock.notify_all()


def connect_and_reconnect(session: Session) -> None:
    # Failures in a row: connects that failed, and connections that did not last (a
    # server accepting then dropping at once must not be hammered), set the backoff.
    terminal, failures = session.terminal, 0
    while not session.stopping:
        try:
            ws = open_socket(session.url, session.options.ping_interval + PONG_TIMEOUT_SECONDS)
        except HandshakeRefused as refusal:
            with session.lock:
                session.fatal = f"the server refused the connection: {refusal}"
                session.lock.notify_all()
            return
        except SOCKET_ERRORS as error:
            failures += 1
            if not session.ever_connected and failures >= session.options.connect_attempts:
                with session.lock:
                    session.fatal = (
                        f"cannot reach {redacted(session.url)}: {describe_error(error)} "
                        f"(after {failures} attempts)"
                    )
                    session.lock.notify_all()
                return
            delay = backoff_delay(failures - 1, session.options.max_backoff)
            terminal.status(f"cannot connect ({describe_error(error)}); retrying in {delay:.1f} s")
            with session.lock:
                session.lock.wait_for(lambda: session.stopping, timeout=delay)
            continue
        opened_at = time.monotonic()
        with session.lock:
            if session.stopping:
                ws.close(timeout=1)
                return
            session.ws, session.ever_connected = ws, True
            session.replies_due, session.last_data = 0, time.monotonic()
            session.pings.clear()
            terminal.status(f"connected to {redacted(session.url)}")
            session._flush()
        ending = receive_until_closed(session, ws)
        ws.shutdown()
        with session.lock:
            session.ws = None
            session.lock.notify_all()
            if session.stopping:
                return
        lasted = time.monotonic() - opened_at
        failures = 1 if lasted >= STABLE_CONNECTION_SECONDS else failures + 1
        delay = backoff_delay(failures - 1, session.options.max_backoff)
        terminal.status(f"connection closed ({ending}); reconnecting in {delay:.1f} s")
        with session.lock:
            session.lock.wait_for(lambda: session.stopping, timeout=delay)


def run_keep_alive(session: Session) -> None:
    with session.lock:
        while not session.stopping:
            session.keep_alive()
            session.lock.wait(timeout=min(1.0, session.options.ping_interval / 4))


# --- Input ----------------------------------------------------------------------------


def handle_line(session: Session, line: str) -> None:
    """One line of input: a command, or a message for the room."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return
    if text.startswith("/") and not text.startswith("//"):
        command = text.strip()
        if command == "/quit":
            with session.lock:
                session.input_done = True
                session.lock.notify_all()
        elif command == "/ping":
            session.submit("ping", {})
        else:
            session.terminal.status(f"unknown command {printable(command)}; {HELP}")
        return
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        session.terminal.status("line not sent: it is not valid UTF-8")
        return
    if text.startswith("//"):
        text = text[1:]
    size = len(encode_frame("message", {"messageBody": text}).encode())
    if size > MESSAGE_LIMIT:
        session.terminal.status(
            f"line not sent: {size} bytes once encoded; API Gateway accepts at most "
            f"{MESSAGE_LIMIT} bytes per message"
        )
        return
    session.submit("message", {"messageBody": text})


def read_input(session: Session, stdin: TextIO) -> None:
    while True:
        line = stdin.readline()
        if not line:
            break
        handle_line(session, line)
        if session.input_done:
            return
    with session.lock:
        session.input_done = True
        session.lock.notify_all()


# --- Main -----------------------------------------------------------------------------


def chat(options: ChatOptions, stdin: TextIO = sys.stdin, terminal: Terminal | None = None) -> int:
    """Run a chat until input ends (0), or it cannot go on (1)."""
    terminal = terminal or Terminal()
    try:
        url = connection_url(options.url, options.room, options.token)
    except ValueError as error:
        terminal.status(str(error))
        return 2
    session = Session(options=options, terminal=terminal, url=url)
    if stdin.isatty():
        terminal.status(HELP)
    for target in (run_connection, run_keep_alive):
        threading.Thread(target=target, args=(session,), daemon=True).start()
    threading.Thread(target=read_input, args=(session, stdin), daemon=True).start()
    try:
        return wait_for_the_end(session)
    except KeyboardInterrupt:
        session.stop()
        return 130


def wait_for_the_end(session: Session) -> int:
    """Wait for end of input (then up to `linger` s for the last replies) or a fatal error."""
    terminal = session.terminal
    with session.lock:
        while not (session.input_done or session.fatal):
            session.lock.wait(timeout=0.5)
        # Lines read before the first connection still go out: wait for it, as long as
        # the connection thread is still trying (its attempts are bounded at start).
        while not (session.ever_connected or session.fatal):
            session.lock.wait(timeout=0.5)
        deadline = time.monotonic() + session.options.linger
        while not (session.fatal or session.settled()) and time.monotonic() < deadline:
            session.lock.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        fatal, unsent, unanswered = session.fatal, len(session.outbox), session.replies_due
    session.stop()
    if fatal:
        terminal.status(fatal)
        return 1
    if unsent:
        terminal.status(f"{unsent} line(s) not sent: the connection did not come back in time")
        return 1
    if unanswered:
        terminal.status(f"{unanswered} message(s) sent but not yet answered when input ended")
    return 0


def run_chat(arguments: argparse.Namespace) -> int:
    """The `chat` command of `python -m local`."""
    for stream in (sys.stdout, sys.stderr):
        # Whatever the room sends must print, even where the terminal's encoding can't.
        stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    # A line that is not UTF-8 is refused with a message (handle_line), not a crash.
    sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    options = ChatOptions(
        url=arguments.url,
        room=arguments.room or None,
        token=arguments.token,
        ping_interval=arguments.ping_interval,
        connect_attempts=max(1, arguments.connect_attempts),
        max_backoff=arguments.max_backoff,
        linger=arguments.linger,
    )
    return chat(options)
