"""Frames: routing, route responses, error frames and size limits."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import websocket

from tests.local_harness import close_frame, connect, variant_template, wait_for, who_am_i

ERROR_FRAME = re.compile(
    r'^\{"message": "(?P<text>[^"]+)", "connectionId":"(?P<connection>[A-Za-z0-9_=-]+)", '
    r'"requestId":"(?P<request>[A-Za-z0-9_=-]+)"\}$'
)


def send_and_receive(ws: websocket.WebSocket, frame: Any) -> str:
    ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return ws.recv()


@pytest.fixture(scope="module")
def routed(stack_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A stack whose API selects `${request.body.service}/${request.body.action}`, has
    a two-way route `chat/join` and a one-way route `chat/oneway`, and no $default."""

    def change(document: dict[str, Any]) -> None:
        resources = document["Resources"]
        resources["WebSocketApi"]["Properties"]["RouteSelectionExpression"] = (
            "${request.body.service}/${request.body.action}"
        )
        for name in ("DefaultRoute", "DefaultRouteResponse", "PingRoute", "PingRouteResponse"):
            del resources[name]
        resources["MessageRoute"]["Properties"]["RouteKey"] = "chat/join"
        oneway = json.loads(json.dumps(resources["MessageRoute"]))
        oneway["Properties"]["RouteKey"] = "chat/oneway"
        del oneway["Properties"]["RouteResponseSelectionExpression"]
        resources["OneWayRoute"] = oneway

    path = variant_template(tmp_path_factory.mktemp("templates"), change)
    return stack_factory(template=path)


def test_frames_are_routed_on_their_exact_action(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    assert json.loads(send_and_receive(ws, {"action": "message"}))["route"] == "message"
    assert json.loads(send_and_receive(ws, {"action": "Message"}))["route"] == "$default"


def test_a_frame_that_is_not_json_goes_to_default_with_its_text(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    assert json.loads(send_and_receive(ws, "hello there")) == {
        "route": "$default",
        "body": "hello there",
    }


def test_the_message_event_is_shaped_like_api_gateways(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    send_and_receive(ws, {"action": "ping", "n": 1})
    event = recording.events(connection_id, "ping")[0]["event"]
    context = event["requestContext"]
    assert set(event) == {"requestContext", "body", "isBase64Encoded"}
    assert event["body"] == '{"action": "ping", "n": 1}'
    assert context["eventType"] == "MESSAGE"
    assert re.fullmatch(r"[A-Za-z0-9_-]{15}=", context["messageId"])
    assert context["requestId"] == context["extendedRequestId"] != context["messageId"]
    connect_context = recording.events(connection_id, "$connect")[0]["event"]["requestContext"]
    assert context["connectedAt"] == connect_context["connectedAt"]


def test_a_handler_exception_answers_an_internal_server_error_frame(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    frame = ERROR_FRAME.match(send_and_receive(ws, {"action": "message", "do": "raise"}))
    assert frame is not None
    assert (frame["text"], frame["connection"]) == ("Internal server error", connection_id)
    failed = [e for e in recording.events(connection_id, "message")]
    assert frame["request"] == failed[-1]["event"]["requestContext"]["requestId"]


def test_a_reply_body_that_is_not_a_string_answers_internal_server_error(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    frame = ERROR_FRAME.match(send_and_receive(ws, {"do": "bad_body"}))
    assert frame is not None and frame["text"] == "Internal server error"


def test_a_two_way_reply_without_body_is_an_empty_frame(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    assert send_and_receive(ws, {"do": "no_body"}) == ""


def test_frames_route_on_a_mixed_selection_expression(routed: Any) -> None:
    stack, _ = routed
    ws = connect(stack.ws_url)
    reply = json.loads(send_and_receive(ws, {"service": "chat", "action": "join"}))
    assert reply["route"] == "chat/join"


def test_without_default_an_unmatched_frame_gets_forbidden_and_the_connection_stays(
    routed: Any,
) -> None:
    stack, _ = routed
    ws = connect(stack.ws_url)
    frame = ERROR_FRAME.match(send_and_receive(ws, {"service": "chat", "action": "nope"}))
    assert frame is not None and frame["text"] == "Forbidden"
    assert (
        json.loads(send_and_receive(ws, {"service": "chat", "action": "join"}))["route"]
        == "chat/join"
    )


def test_a_route_without_route_response_sends_nothing_back(routed: Any) -> None:
    stack, recording = routed
    ws = connect(stack.ws_url)
    ws.send(json.dumps({"service": "chat", "action": "oneway"}))
    reply = json.loads(send_and_receive(ws, {"service": "chat", "action": "join", "do": "whoami"}))
    wait_for(
        lambda: recording.events(reply["connectionId"], "chat/oneway"), what="the one-way call"
    )
    ws.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()


def test_a_binary_frame_closes_the_connection_with_1003(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.send_binary(b"\x00\x01")
    assert close_frame(ws)[0] == 1003
    assert recording.disconnect_of(connection_id)["requestContext"]["disconnectStatusCode"] == 1003


def test_a_frame_over_32_kb_closes_the_connection_with_1009(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    ws.send("x" * (32 * 1024 + 1))
    assert close_frame(ws)[0] == 1009


def test_a_message_in_frames_of_32_kb_is_accepted(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    text = json.dumps({"action": "message", "pad": "x" * 90_000})
    chunks = [text[i : i + 32 * 1024] for i in range(0, len(text), 32 * 1024)]
    ws.send_frame(websocket.ABNF.create_frame(chunks[0], websocket.ABNF.OPCODE_TEXT, fin=0))
    for chunk in chunks[1:-1]:
        ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_CONT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame(chunks[-1], websocket.ABNF.OPCODE_CONT, fin=1))
    assert json.loads(ws.recv())["body"] == text


def test_a_message_over_128_kb_closes_the_connection_with_1009(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    chunk = "x" * (32 * 1024)
    ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_TEXT, fin=0))
    for _ in range(3):
        ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_CONT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame("x", websocket.ABNF.OPCODE_CONT, fin=1))
    assert close_frame(ws)[0] == 1009
