"""How connections end: close codes, timeouts and $disconnect."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import websocket

from tests.local_harness import close_frame, connect, who_am_i

IDLE_TIMEOUT = 1.0
MAX_DURATION = 3.0


@pytest.fixture(scope="module")
def short_lived(stack_factory: Any) -> Any:
    """A stack with a 1 s idle timeout and a 3 s maximum duration."""
    return stack_factory(idle_timeout=IDLE_TIMEOUT, max_duration=MAX_DURATION)


def disconnect_code(recording: Any, connection_id: str) -> tuple[int, str]:
    context = recording.disconnect_of(connection_id)["requestContext"]
    return context["disconnectStatusCode"], context["disconnectReason"]


def test_a_client_close_reports_its_code_and_reason(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.close(status=4001, reason=b"see you")
    assert disconnect_code(recording, connection_id) == (4001, "see you")


def test_a_close_frame_without_code_reports_1005(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.send_frame(websocket.ABNF.create_frame(b"", websocket.ABNF.OPCODE_CLOSE))
    close_frame(ws)
    ws.shutdown()
    assert disconnect_code(recording, connection_id) == (
        1005,
        "Client-side close frame status not set",
    )


def test_a_dropped_tcp_connection_reports_1006(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.sock.shutdown(socket.SHUT_RDWR)
    ws.sock.close()
    assert disconnect_code(recording, connection_id)[0] == 1006


def test_delete_connection_closes_with_1000_and_reports_it(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    stack.management_client().delete_connection(ConnectionId=connection_id)
    assert close_frame(ws)[0] == 1000
    assert disconnect_code(recording, connection_id) == (1000, "Connection Closed Normally")


def test_the_disconnect_event_is_shaped_like_api_gateways(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url + "?room=lobby", header={"User-Agent": "pytest-agent"})
    connection_id = who_am_i(ws)
    ws.close()
    event = recording.disconnect_of(connection_id)
    context = event["requestContext"]
    host = stack.http_url.removeprefix("http://")
    assert set(event) == {"headers", "multiValueHeaders", "requestContext", "isBase64Encoded"}
    assert event["headers"] == {
        "Host": host,
        "x-api-key": "",
        "X-Forwarded-For": "",
        "x-restapi": "",
    }
    assert event["multiValueHeaders"]["Host"] == [host]
    assert context["eventType"] == "DISCONNECT"
    assert context["requestId"] == context["extendedRequestId"]
    assert "messageId" not in context
    assert context["identity"] == {"sourceIp": "127.0.0.1", "userAgent": "pytest-agent"}


def test_a_lost_disconnect_is_never_invoked(scripted: Any) -> None:
    stack, recording = scripted
    lost, kept = connect(stack.ws_url), connect(stack.ws_url)
    lost_id, kept_id = who_am_i(lost), who_am_i(kept)
    stack.lose_disconnect(lost_id)
    lost.close()
    kept.close()
    recording.disconnect_of(kept_id)
    time.sleep(0.3)
    assert recording.events(lost_id, "$disconnect") == []


def test_an_idle_connection_is_closed_with_1001_going_away(short_lived: Any) -> None:
    stack, recording = short_lived
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    assert close_frame(ws) == (1001, "Going away")
    assert disconnect_code(recording, connection_id) == (1001, "Going away")


def test_protocol_pings_do_not_keep_a_connection_open(short_lived: Any) -> None:
    stack, _ = short_lived
    ws = connect(stack.ws_url, timeout=0.2)
    who_am_i(ws)
    closed_by = None
    deadline = time.monotonic() + MAX_DURATION - 0.5
    while closed_by is None and time.monotonic() < deadline:
        ws.ping()
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            continue
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            closed_by = int.from_bytes(frame.data[:2], "big")
    assert closed_by == 1001


def test_management_api_posts_keep_a_connection_open(short_lived: Any) -> None:
    stack, _ = short_lived
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = stack.management_client()
    for number in range(8):  # 1.6 s of posts, longer than the idle timeout
        client.post_to_connection(ConnectionId=connection_id, Data=str(number).encode())
        assert ws.recv() == str(number)
        time.sleep(0.2)
    assert close_frame(ws) == (1001, "Going away")


def test_a_connection_is_closed_at_its_maximum_duration_even_when_busy(short_lived: Any) -> None:
    stack, recording = short_lived
    ws = connect(stack.ws_url, timeout=0.2)
    connection_id = who_am_i(ws)
    closed_by = None
    while closed_by is None:
        ws.send(json.dumps({"action": "ping"}))
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            continue
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            closed_by = int.from_bytes(frame.data[:2], "big")
        time.sleep(0.15)
    context = recording.disconnect_of(connection_id)["requestContext"]
    assert (closed_by, context["disconnectStatusCode"]) == (1001, 1001)
    assert context["requestTimeEpoch"] - context["connectedAt"] >= MAX_DURATION * 1000
