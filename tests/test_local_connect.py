"""The upgrade and $connect, as API Gateway does them (real sockets, real workers)."""

from __future__ import annotations

import re
import socket
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.local_harness import (
    connect,
    raw_request,
    upgrade_request,
    variant_template,
    wait_for,
    who_am_i,
)

ID = re.compile(r"^[A-Za-z0-9_-]{15}=$")


def test_the_root_serves_the_page_in_local_static(scripted: Any) -> None:
    stack, _ = scripted
    page = Path(__file__).resolve().parent.parent / "local" / "static" / "index.html"
    if not page.exists():
        pytest.skip("no local/static/index.html to serve")
    with urllib.request.urlopen(stack.http_url + "/", timeout=10) as response:  # noqa: S310 - loopback
        assert response.read() == page.read_bytes()


def test_a_plain_get_on_the_stage_answers_426(scripted: Any) -> None:
    stack, _ = scripted
    status, _, _ = raw_request(stack.http_url, ["GET /local HTTP/1.1", "Host: x"])
    assert status == 426


def test_an_unknown_stage_answers_403(scripted: Any) -> None:
    stack, _ = scripted
    status, _, _ = raw_request(stack.http_url, upgrade_request(stack.http_url, "/prod"))
    assert status == 403


def test_a_non_2xx_connect_status_rejects_the_handshake_with_it(scripted: Any) -> None:
    stack, _ = scripted
    with pytest.raises(websocket.WebSocketBadStatusException) as rejected:
        connect(stack.ws_url + "?status=401")
    assert rejected.value.status_code == 401


def test_a_connect_exception_answers_502(scripted: Any) -> None:
    stack, _ = scripted
    with pytest.raises(websocket.WebSocketBadStatusException) as rejected:
        connect(stack.ws_url + "?raise=1")
    assert rejected.value.status_code == 502


def test_a_connect_result_without_status_code_answers_502(scripted: Any) -> None:
    stack, _ = scripted
    with pytest.raises(websocket.WebSocketBadStatusException) as rejected:
        connect(stack.ws_url + "?result=none")
    assert rejected.value.status_code == 502


def test_a_rejected_connection_leaves_no_connection_behind(scripted: Any) -> None:
    stack, recording = scripted
    tag = uuid.uuid4().hex
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(stack.ws_url + f"?status=403&tag={tag}")
    connection_id = recording.connect_tagged(tag)["event"]["requestContext"]["connectionId"]
    assert connection_id not in [c["connectionId"] for c in stack.connections()]


def test_the_subprotocol_is_echoed_when_the_handler_returns_it(scripted: Any) -> None:
    stack, _ = scripted
    request = upgrade_request(
        stack.http_url, "/local?protocol=chat", ["Sec-WebSocket-Protocol: json, chat"]
    )
    status, headers, _ = raw_request(stack.http_url, request)
    assert (status, headers.get("sec-websocket-protocol")) == (101, "chat")


def test_no_subprotocol_is_chosen_when_the_handler_returns_none(scripted: Any) -> None:
    stack, _ = scripted
    request = upgrade_request(stack.http_url, "/local", ["Sec-WebSocket-Protocol: json, chat"])
    status, headers, _ = raw_request(stack.http_url, request)
    assert status == 101
    assert "sec-websocket-protocol" not in headers


def test_a_post_to_a_connection_still_in_connect_is_gone(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url + "?post_self=1")
    ws.close()
    outcomes = wait_for(lambda: recording.entries("post_self"), what="the handler's own post")
    assert outcomes[-1]["outcome"] == "GoneException"


def test_a_client_that_leaves_during_connect_gets_a_disconnect(scripted: Any) -> None:
    stack, recording = scripted
    tag = uuid.uuid4().hex
    host, port = stack.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        request = upgrade_request(stack.http_url, f"/local?sleep=0.5&tag={tag}")
        sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode())
        connection_id = recording.connect_tagged(tag)["event"]["requestContext"]["connectionId"]
    assert recording.disconnect_of(connection_id)["requestContext"]["disconnectStatusCode"] == 1006


def test_the_connect_event_is_shaped_like_api_gateways(scripted: Any) -> None:
    stack, recording = scripted
    tag = uuid.uuid4().hex
    ws = connect(
        stack.ws_url + f"?tag={tag}&room=a&room=b",
        header={"User-Agent": "pytest-agent", "X-Custom-Header": "Yes"},
    )
    ws.close()
    entry = recording.connect_tagged(tag)
    event = entry["event"]
    context = event["requestContext"]
    host = stack.http_url.removeprefix("http://")

    assert set(event) == {
        "headers",
        "multiValueHeaders",
        "queryStringParameters",
        "multiValueQueryStringParameters",
        "requestContext",
        "isBase64Encoded",
    }
    assert event["queryStringParameters"] == {"tag": tag, "room": "b"}
    assert event["multiValueQueryStringParameters"]["room"] == ["a", "b"]
    headers = event["headers"]
    assert headers["Host"] == host
    assert headers["X-Custom-Header"] == "Yes"
    assert headers["User-Agent"] == "pytest-agent"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert (headers["X-Forwarded-Port"], headers["X-Forwarded-Proto"]) == ("443", "https")
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24}", headers["X-Amzn-Trace-Id"])
    assert not {"connection", "upgrade"} & {name.lower() for name in headers}
    assert event["multiValueHeaders"]["Host"] == [host]

    assert context["routeKey"] == "$connect"
    assert context["eventType"] == "CONNECT"
    assert context["requestId"] == context["extendedRequestId"]
    assert ID.match(context["connectionId"]) and ID.match(context["requestId"])
    assert "messageId" not in context
    assert context["identity"] == {"sourceIp": "127.0.0.1", "userAgent": "pytest-agent"}
    assert context["domainName"] == host
    assert context["stage"] == "local"
    assert context["requestTimeEpoch"] >= context["connectedAt"] > 1_600_000_000_000
    assert event["isBase64Encoded"] is False


def test_a_connect_without_query_string_has_no_query_keys_nor_user_agent(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.close()
    event = recording.events(connection_id, "$connect")[0]["event"]
    assert "queryStringParameters" not in event
    assert "multiValueQueryStringParameters" not in event
    assert event["requestContext"]["identity"] == {"sourceIp": "127.0.0.1"}


def test_without_a_connect_route_the_upgrade_is_accepted(stack_factory: Any, tmp_path: Any) -> None:
    def remove_connect(document: dict[str, Any]) -> None:
        del document["Resources"]["ConnectRoute"]

    stack, recording = stack_factory(template=variant_template(tmp_path, remove_connect))
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.close()
    assert recording.events(connection_id, "$connect") == []
