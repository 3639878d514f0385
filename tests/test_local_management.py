"""The @connections management API, through a plain boto3 client (and raw HTTP where
the exact answer matters)."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
import websocket
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.local_harness import close_frame, connect, raw_request, wait_for, who_am_i


def test_posts_arrive_as_text_frames_in_order(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = stack.management_client()
    for number in range(50):
        client.post_to_connection(ConnectionId=connection_id, Data=f"message {number}".encode())
    frames = [ws.recv_data_frame()[0:2] for _ in range(50)]
    assert [opcode for opcode, _ in frames] == [websocket.ABNF.OPCODE_TEXT] * 50
    assert [frame.data.decode() for _, frame in frames] == [f"message {n}" for n in range(50)]


def test_posts_to_a_client_that_does_not_read_are_refused_with_429_not_held(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024),))
    connection_id = who_am_i(ws)
    client = stack.management_client(retries={"total_max_attempts": 1}, read_timeout=10)
    accepted = 0
    with pytest.raises(client.exceptions.LimitExceededException):
        for _ in range(400):  # 50 MB: far more than the socket buffers and the gateway's 4 MB
            client.post_to_connection(ConnectionId=connection_id, Data=b"x" * 128 * 1024)
            accepted += 1
    assert sum(len(ws.recv()) for _ in range(accepted)) == accepted * 128 * 1024


def test_a_post_to_an_unknown_connection_raises_gone(scripted: Any) -> None:
    stack, _ = scripted
    client = stack.management_client()
    with pytest.raises(client.exceptions.GoneException):
        client.post_to_connection(ConnectionId="AAAAAAAAAAAAAAA=", Data=b"hello")


def test_a_post_to_a_closed_connection_raises_gone(scripted: Any) -> None:
    stack, recording = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    ws.close()
    recording.disconnect_of(connection_id)
    client = stack.management_client()
    with pytest.raises(client.exceptions.GoneException):
        client.post_to_connection(ConnectionId=connection_id, Data=b"hello")


def test_a_post_over_128_kb_raises_payload_too_large(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    client = stack.management_client()
    with pytest.raises(client.exceptions.PayloadTooLargeException):
        client.post_to_connection(ConnectionId=who_am_i(ws), Data=b"x" * (128 * 1024 + 1))


def test_a_post_of_exactly_128_kb_is_delivered(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    stack.management_client().post_to_connection(ConnectionId=who_am_i(ws), Data=b"x" * 128 * 1024)
    assert len(ws.recv()) == 128 * 1024


def test_a_post_over_32_kb_arrives_as_one_message_in_frames_of_32_kb(scripted: Any) -> None:
    """API Gateway splits what it sends into frames of at most 32 KB; a character
    may straddle two frames, and the message is still whole and in order."""
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    text = "x" + "é" * 50_000  # 100,001 bytes: a 2-byte character split at 32,768
    client = stack.management_client()
    client.post_to_connection(ConnectionId=connection_id, Data=text.encode())
    client.post_to_connection(ConnectionId=connection_id, Data=b"next")

    frames = [ws.recv_frame() for _ in range(5)]

    assert [(frame.opcode, frame.fin, len(frame.data)) for frame in frames] == [
        (websocket.ABNF.OPCODE_TEXT, 0, 32 * 1024),
        (websocket.ABNF.OPCODE_CONT, 0, 32 * 1024),
        (websocket.ABNF.OPCODE_CONT, 0, 32 * 1024),
        (websocket.ABNF.OPCODE_CONT, 1, 100_001 - 3 * 32 * 1024),
        (websocket.ABNF.OPCODE_TEXT, 1, 4),
    ]
    assert b"".join(frame.data for frame in frames[:4]).decode() == text


def test_a_split_post_is_reassembled_by_a_client(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    text = "x" + "é" * 50_000
    stack.management_client().post_to_connection(ConnectionId=connection_id, Data=text.encode())
    assert ws.recv() == text


def test_a_post_that_is_not_utf_8_arrives_unchanged_as_binary(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    data = b"\xff\xfe" * 20_000  # over one frame too
    stack.management_client().post_to_connection(ConnectionId=who_am_i(ws), Data=data)
    opcode, received = ws.recv_data()
    assert (opcode, received) == (websocket.ABNF.OPCODE_BINARY, data)


def test_a_malformed_connection_id_is_a_bad_request(scripted: Any) -> None:
    stack, _ = scripted
    with pytest.raises(ClientError) as refused:
        stack.management_client().post_to_connection(ConnectionId="not-an-id", Data=b"hello")
    assert refused.value.response["Error"]["Code"] == "BadRequestException"
    assert refused.value.response["Error"]["Message"] == "Invalid connectionId: not-an-id"


def test_a_call_signed_with_other_keys_is_forbidden(scripted: Any) -> None:
    stack, _ = scripted
    client = boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=stack.callback_url,
        region_name=stack.region,
        aws_access_key_id=stack.credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key="not-the-secret",
    )
    with pytest.raises(client.exceptions.ForbiddenException):
        client.post_to_connection(ConnectionId="AAAAAAAAAAAAAAA=", Data=b"hello")


def test_an_unsigned_call_is_forbidden(scripted: Any) -> None:
    stack, _ = scripted
    client = boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=stack.callback_url,
        region_name=stack.region,
        config=Config(signature_version=UNSIGNED),
    )
    with pytest.raises(client.exceptions.ForbiddenException, match="Missing Authentication Token"):
        client.post_to_connection(ConnectionId="AAAAAAAAAAAAAAA=", Data=b"hello")


def test_errors_carry_the_error_type_and_a_request_id(scripted: Any) -> None:
    stack, _ = scripted
    status, headers, body = raw_request(
        stack.http_url,
        ["POST /local/@connections/AAAAAAAAAAAAAAA= HTTP/1.1", "Host: x", "Content-Length: 0"],
    )
    assert status == 403
    assert headers["x-amzn-errortype"] == "ForbiddenException"
    assert headers["x-amzn-requestid"]
    assert json.loads(body) == {"message": "Missing Authentication Token"}


def test_the_stage_less_path_is_an_alias(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = boto3.client(
        "apigatewaymanagementapi", endpoint_url=stack.http_url, **stack.boto3_kwargs()
    )
    client.post_to_connection(ConnectionId=connection_id, Data=b"via the alias")
    assert ws.recv() == "via the alias"


def test_get_connection_describes_the_connection(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url, header={"User-Agent": "pytest-agent"})
    connection_id = who_am_i(ws)
    before_post = datetime.now(UTC) - timedelta(seconds=1)
    client = stack.management_client()
    client.post_to_connection(ConnectionId=connection_id, Data=b"hello")
    described = client.get_connection(ConnectionId=connection_id)
    assert described["Identity"] == {"SourceIp": "127.0.0.1", "UserAgent": "pytest-agent"}
    assert described["ConnectedAt"] <= described["LastActiveAt"]
    assert described["LastActiveAt"] >= before_post


def test_delete_connection_answers_204_and_then_gone(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = stack.management_client()
    deleted = client.delete_connection(ConnectionId=connection_id)
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(client.exceptions.GoneException):
        client.get_connection(ConnectionId=connection_id)
    assert close_frame(ws)[0] == 1000


def test_post_latency_delays_each_call(stack_factory: Any) -> None:
    stack, _ = stack_factory(post_latency_ms=300, concurrency=1)
    client = stack.management_client()
    started = time.monotonic()
    with pytest.raises(client.exceptions.GoneException):
        client.post_to_connection(ConnectionId="AAAAAAAAAAAAAAA=", Data=b"hello")
    assert time.monotonic() - started >= 0.3


@pytest.fixture(scope="module")
def faulty(stack_factory: Any) -> Any:
    """Every post finds its recipient gone (dropped without $disconnect); calls need no
    signature."""
    return stack_factory(fault_gone_rate=1.0, verify_sigv4=False, concurrency=1)


def test_an_injected_gone_drops_the_client_and_loses_its_disconnect(faulty: Any) -> None:
    stack, recording = faulty
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = stack.management_client()
    with pytest.raises(client.exceptions.GoneException):
        client.post_to_connection(ConnectionId=connection_id, Data=b"hello")
    ws.settimeout(5)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv()  # the TCP connection ends without a close frame
    time.sleep(0.3)
    assert recording.events(connection_id, "$disconnect") == []


def test_get_connection_answers_iso_8601_utc_with_milliseconds(faulty: Any) -> None:
    stack, _ = faulty
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    request = [f"GET /local/@connections/{connection_id} HTTP/1.1", "Host: x"]
    status, headers, body = raw_request(stack.http_url, request)
    document = json.loads(body)
    assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
    for field in ("connectedAt", "lastActiveAt"):
        assert datetime.strptime(document[field], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert len(document[field].split(".")[1]) == len("123Z")


def test_without_sigv4_checks_unsigned_calls_are_answered(faulty: Any) -> None:
    stack, _ = faulty
    client = boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=stack.callback_url,
        region_name=stack.region,
        config=Config(signature_version=UNSIGNED),
    )
    with pytest.raises(client.exceptions.GoneException):
        client.get_connection(ConnectionId="AAAAAAAAAAAAAAA=")


def test_injected_throttling_answers_429_for_a_share_of_posts_and_delivers_the_rest(
    stack_factory: Any,
) -> None:
    stack, _ = stack_factory(fault_throttle_rate=0.5, fault_seed=7, concurrency=1)
    ws = connect(stack.ws_url)
    connection_id = who_am_i(ws)
    client = stack.management_client(retries={"total_max_attempts": 1})
    delivered = []
    for number in range(100):
        try:
            client.post_to_connection(ConnectionId=connection_id, Data=str(number).encode())
            delivered.append(str(number))
        except client.exceptions.LimitExceededException:
            pass
    assert 25 <= len(delivered) <= 75
    received = [ws.recv() for _ in delivered]
    ws.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        ws.recv()
    assert received == delivered
    posts = stack.stats()["posts"]
    assert (posts["delivered"], posts["injectedThrottle"]) == (len(delivered), 100 - len(delivered))


def test_the_local_connection_list_shows_live_connections(scripted: Any) -> None:
    stack, _ = scripted
    ws = connect(stack.ws_url + "?room=listed")
    connection_id = who_am_i(ws)
    listed = wait_for(
        lambda: [c for c in stack.connections() if c["connectionId"] == connection_id],
        what="the connection in the list",
    )
    assert listed[0]["query"] == {"room": ["listed"]}
