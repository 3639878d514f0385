"""The Lambda, one test per behaviour: DynamoDB from moto (the table made from
template.json), the management API a scripted HTTP server on loopback, events
from local/events.py."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local import events
from tests.lambda_harness import connect, items, send

# --- $connect ---------------------------------------------------------------------------


def test_connect_stores_membership_and_connection_items_with_ttl_in_seconds(handler):
    before = int(time.time())
    connection = connect(handler, "lobby", age=0)

    stored = {item["PK"]: item for item in items(handler)}
    membership = stored["ROOM#lobby"]
    details = stored[f"CONN#{connection.connection_id}"]
    assert membership["connectionId"] == details["connectionId"] == connection.connection_id
    assert details["room"] == "lobby"
    assert details["sourceIp"] == connection.source_ip
    assert membership["connectedAt"] == details["connectedAt"] == connection.connected_at
    # Seconds, not milliseconds: 2 h 15 min after the connection was made.
    for item in (membership, details):
        assert before + 8100 - 2 <= item["expiresAt"] <= int(time.time()) + 8100 + 2
    assert len(stored) == 2


def test_connect_without_query_string_joins_the_default_room(handler):
    connection = events.Connection()
    event = events.connect(connection)
    assert "queryStringParameters" not in event

    assert handler.lambda_handler(event, None)["statusCode"] == 200
    assert {item["PK"] for item in items(handler)} == {
        f"ROOM#{handler.DEFAULT_ROOM}",
        f"CONN#{connection.connection_id}",
    }


def test_connect_with_null_query_string_joins_the_default_room(handler):
    event = events.connect(events.Connection())
    event["queryStringParameters"] = None
    event["multiValueQueryStringParameters"] = None

    assert handler.lambda_handler(event, None)["statusCode"] == 200
    assert f"ROOM#{handler.DEFAULT_ROOM}" in {item["PK"] for item in items(handler)}


def test_connect_with_query_string_but_no_room_joins_the_default_room(handler):
    connect(handler, None, token="x")
    assert f"ROOM#{handler.DEFAULT_ROOM}" in {item["PK"] for item in items(handler)}


@pytest.mark.parametrize(
    "room",
    ["", "a b", "1#CONN#x", "ROOM#1", "../", "café", "x" * 65, "lobby\n", "\u0000"],
)
def test_connect_with_bad_room_is_refused_with_400_and_stores_nothing(handler, room):
    event = events.connect(events.Connection(), {"room": room})

    response = handler.lambda_handler(event, None)

    assert response["statusCode"] == 400
    assert "room" in json.loads(response["body"])["error"]
    assert items(handler) == []


def test_connect_accepts_every_allowed_character_up_to_64(handler):
    room = ("Az09_.-" * 10)[:64]
    connect(handler, room)
    assert f"ROOM#{room}" in {item["PK"] for item in items(handler)}


def test_connect_with_repeated_room_parameter_is_refused(handler):
    event = events.connect(events.Connection(), [("room", "a"), ("room", "b")])

    assert handler.lambda_handler(event, None)["statusCode"] == 400
    assert items(handler) == []


# --- $disconnect ------------------------------------------------------------------------


def test_disconnect_removes_both_items(handler):
    leaving = connect(handler, "lobby")
    staying = connect(handler, "lobby")

    response = handler.lambda_handler(events.disconnect(leaving, 1000, "bye"), None)

    assert response["statusCode"] == 200
    assert {item["connectionId"] for item in items(handler)} == {staying.connection_id}


def test_disconnect_twice_is_fine(handler):
    connection = connect(handler, "lobby")
    for _ in range(2):
        assert handler.lambda_handler(events.disconnect(connection), None)["statusCode"] == 200
    assert items(handler) == []


def test_disconnect_of_a_connection_never_stored_is_fine(handler):
    response = handler.lambda_handler(events.disconnect(events.Connection()), None)
    assert response["statusCode"] == 200


# --- message: who gets what -------------------------------------------------------------


def test_broadcast_reaches_every_other_member_but_not_the_sender_or_other_rooms(handler):
    sender, alice, bob = (connect(handler, "lobby") for _ in range(3))
    outsider = connect(handler, "kitchen")

    reply = send(handler, sender, {"action": "message", "messageBody": "hello"})

    delivered = handler.api.delivered()
    assert set(delivered) == {alice.connection_id, bob.connection_id}
    assert sender.connection_id not in delivered and outsider.connection_id not in delivered
    assert reply["action"] == "sent"
    assert (reply["recipients"], reply["delivered"], reply["stale"], reply["failed"]) == (
        2,
        2,
        0,
        0,
    )


def test_recipients_get_the_envelope_with_message_id_room_sender_and_request_time(handler):
    sender, recipient = connect(handler, "lobby"), connect(handler, "lobby")
    event = events.message(
        sender, json.dumps({"action": "message", "messageBody": {"x": [1, "ü"]}}), "message"
    )

    response = handler.lambda_handler(event, None)

    (body,) = handler.api.delivered()[recipient.connection_id]
    assert json.loads(body) == {
        "action": "message",
        "id": event["requestContext"]["messageId"],
        "room": "lobby",
        "from": sender.connection_id,
        "sentAt": event["requestContext"]["requestTimeEpoch"],
        "messageBody": {"x": [1, "ü"]},
    }
    assert json.loads(response["body"])["id"] == event["requestContext"]["messageId"]


@pytest.mark.parametrize("value", ["text", 0, False, [], {}, [1, {"a": None}], 1.5, ""])
def test_any_json_value_but_null_is_a_message_body(handler, value):
    sender, recipient = connect(handler, "lobby"), connect(handler, "lobby")

    send(handler, sender, {"action": "message", "messageBody": value})

    (body,) = handler.api.delivered()[recipient.connection_id]
    assert json.loads(body)["messageBody"] == value


def test_the_room_comes_from_the_connection_item_never_from_the_frame(handler):
    sender = connect(handler, "lobby")
    other_room = connect(handler, "kitchen")

    reply = send(handler, sender, {"action": "message", "messageBody": "hi", "room": "kitchen"})

    assert reply["recipients"] == 0
    assert other_room.connection_id not in handler.api.delivered()


def test_alone_in_a_room_the_sender_gets_a_sent_reply_with_zero_recipients(handler):
    sender = connect(handler, "lobby")
    reply = send(handler, sender, {"action": "message", "messageBody": "anyone?"})
    assert (reply["recipients"], reply["delivered"]) == (0, 0)
    assert handler.api.posts == []


def test_a_sender_without_a_connection_item_gets_an_error_and_nothing_is_sent(handler):
    connect(handler, "lobby")
    stranger = events.Connection()

    reply = send(handler, stranger, {"action": "message", "messageBody": "hi"})

    assert reply["action"] == "error" and reply["status"] == 404
    assert handler.api.posts == []


def test_a_message_ref_is_echoed_in_the_sent_reply_and_not_sent_to_recipients(handler):
    sender, recipient = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "x", "ref": "msg-7"})

    assert (reply["action"], reply["ref"]) == ("sent", "msg-7")
    (body,) = handler.api.delivered()[recipient.connection_id]
    assert "ref" not in json.loads(body)


def test_a_message_ref_is_echoed_in_error_replies(handler, monkeypatch):
    monkeypatch.setattr(handler, "MAX_MESSAGE_BYTES", 10)
    sender = connect(handler, "lobby")

    missing = send(handler, sender, {"action": "message", "ref": "a"})
    too_big = send(handler, sender, {"action": "message", "messageBody": "x" * 20, "ref": "b"})

    assert (missing["status"], missing["ref"]) == (400, "a")
    assert (too_big["status"], too_big["ref"]) == (413, "b")


def test_without_a_ref_the_reply_has_none(handler):
    sender = connect(handler, "lobby")
    assert "ref" not in send(handler, sender, {"action": "message", "messageBody": "x"})


@pytest.mark.parametrize("ref", [7, ["a"], "r" * 65])
def test_a_ref_that_is_not_a_short_string_is_refused(handler, ref):
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "x", "ref": ref})

    assert reply["status"] == 400 and "ref" in reply["error"]
    assert handler.api.posts == []


# --- message: pages and parallelism -------------------------------------------------------


def test_broadcast_reads_every_page_of_a_big_room_consistently(handler, monkeypatch):
    monkeypatch.setattr(handler, "FIRST_PAGE_SIZE", 1)
    monkeypatch.setattr(handler, "QUERY_PAGE_SIZE", 2)
    sender = connect(handler, "lobby")
    others = [connect(handler, "lobby") for _ in range(6)]
    pages = []
    real_query = handler.dynamodb.query

    requests = []

    def counting_query(**request):
        requests.append(request)
        page = real_query(**request)
        pages.append(len(page["Items"]))
        return page

    monkeypatch.setattr(handler.dynamodb, "query", counting_query)

    reply = send(handler, sender, {"action": "message", "messageBody": "all of you"})

    assert len(pages) >= 4 and sum(pages) == 7
    assert all(request["ConsistentRead"] for request in requests)
    # A small first page, so posting starts early; then bigger ones.
    assert [request["Limit"] for request in requests[:3]] == [1, 2, 2]
    assert set(handler.api.delivered()) == {other.connection_id for other in others}
    assert reply["delivered"] == 6


def test_posting_starts_while_the_next_page_is_being_read(handler, monkeypatch):
    monkeypatch.setattr(handler, "FIRST_PAGE_SIZE", 2)
    monkeypatch.setattr(handler, "QUERY_PAGE_SIZE", 2)
    sender = connect(handler, "lobby")
    for _ in range(4):
        connect(handler, "lobby")
    first_post = threading.Event()
    handler.api.on_post = lambda post: first_post.set()
    posted_before_second_page = []
    real_query = handler.dynamodb.query

    def query_waiting_for_a_post(**request):
        if "ExclusiveStartKey" in request and not posted_before_second_page:
            # Deadlock-free check: if posts only started after every page was read,
            # this wait times out and records False.
            posted_before_second_page.append(first_post.wait(timeout=10))
        return real_query(**request)

    monkeypatch.setattr(handler.dynamodb, "query", query_waiting_for_a_post)

    send(handler, sender, {"action": "message", "messageBody": "x"})

    assert posted_before_second_page == [True]


def test_the_payload_is_encoded_once_per_broadcast_whatever_the_room_size(handler, monkeypatch):
    sender = connect(handler, "lobby")
    for _ in range(5):
        connect(handler, "lobby")
    calls = {"encode_message_body": 0, "recipient_envelope": 0}
    for name in calls:
        real = getattr(handler, name)

        def counting(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(handler, name, counting)

    send(handler, sender, {"action": "message", "messageBody": "same bytes for all"})

    assert calls == {"encode_message_body": 1, "recipient_envelope": 1}
    bodies = {post.body for post in handler.api.posts}
    assert len(bodies) == 1 and len(handler.api.posts) == 5


def test_the_management_client_is_created_once_across_invocations(handler):
    sender = connect(handler, "lobby")
    for _ in range(3):
        connect(handler, "lobby")

    for _ in range(5):
        send(handler, sender, {"action": "message", "messageBody": "again"})

    assert list(handler.management_apis) == [handler.api.url]
    assert len(handler.api.posts) == 15
    # Connections are pooled and reused: never one per post or per invocation.
    assert handler.api.tcp_connections <= 3


def test_the_fanout_pool_and_its_connections_are_bounded_by_fanout_concurrency(handler):
    sender = connect(handler, "lobby")
    for _ in range(2 * handler.FANOUT_CONCURRENCY):
        connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert reply["delivered"] == 2 * handler.FANOUT_CONCURRENCY
    assert handler.fanout_pool._max_workers == handler.FANOUT_CONCURRENCY
    assert 1 <= handler.api.tcp_connections <= handler.FANOUT_CONCURRENCY


def test_posts_go_out_without_nagle_delay(handler):
    """Without TCP_NODELAY a post's body waits ~40 ms for the delayed ACK of its headers."""
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")
    send(handler, sender, {"action": "message", "messageBody": "x"})

    (api,) = handler.management_apis.values()
    assert api.idle
    assert all(c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in api.idle)


def test_posts_carry_a_sigv4_signature_botocore_accepts(handler):
    sender, recipient = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "signed"})

    # The scripted endpoint answers 403 to any signature botocore's arithmetic rejects.
    assert reply["delivered"] == 1
    (post,) = handler.api.posts
    keys = handler.signing_keys()
    assert post.headers["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/"
    )
    assert "/us-east-1/execute-api/aws4_request" in post.headers["Authorization"]
    assert post.headers["X-Amz-Security-Token"] == keys.token
    assert post.path == "/test/@connections/" + recipient.connection_id.replace("=", "%3D")


@pytest.mark.parametrize(
    "url",
    [
        "https://abc123defg.execute-api.us-east-1.amazonaws.com/prod",
        "https://abc123defg.execute-api.us-east-1.amazonaws.com:443/prod",
        "http://127.0.0.1:8080/local",
        "https://chat.example.com/base/path",
    ],
)
@pytest.mark.parametrize("token", ["session-token", None])
def test_signed_headers_match_botocores_sigv4_for_any_endpoint(handler, url, token):
    from botocore.credentials import ReadOnlyCredentials

    from local.sigv4 import verify

    api = handler.open_management_api(url)
    keys = ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    payload = b'{"action":"message","messageBody":"\xc3\xa9"}'
    outgoing = handler.Outgoing(api, payload, hashlib.sha256(payload).hexdigest(), keys)
    path = f"{api.path}/@connections/{quote('R1kmxc2-_VNjMCFIA=', safe='')}"

    headers = {"Host": api.host, **handler.signed_headers(outgoing, path)}

    problem = verify(
        method="POST",
        host=api.host,
        raw_path=path,
        headers=headers,
        body=payload,
        secrets={keys.access_key: keys.secret_key},
        region="us-east-1",
    )
    assert problem is None
    assert ("X-Amz-Security-Token" in headers) == (token is not None)


# --- message: recipients that fail --------------------------------------------------------


def test_gone_recipients_are_deleted_and_the_others_delivered(handler):
    sender = connect(handler, "lobby")
    gone = connect(handler, "lobby")
    alive = connect(handler, "lobby")
    handler.api.answer(gone.connection_id, 410)

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["recipients"], reply["delivered"], reply["stale"], reply["failed"]) == (
        2,
        1,
        1,
        0,
    )
    assert alive.connection_id in handler.api.delivered()
    remaining = {item["connectionId"] for item in items(handler)}
    assert remaining == {sender.connection_id, alive.connection_id}


def test_a_gone_recipient_that_may_still_be_in_its_connect_keeps_its_items(handler):
    """API Gateway answers 410 to a connection whose $connect is still running, after
    its items were written: deleting them would leave it connected but in no room."""
    sender = connect(handler, "lobby")
    joining = connect(handler, "lobby", age=handler.CONNECT_WINDOW_SECONDS - 5)
    handler.api.answer(joining.connection_id, 410)

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["recipients"], reply["stale"]) == (1, 1)
    remaining = {item["connectionId"] for item in items(handler)}
    assert remaining == {sender.connection_id, joining.connection_id}


def test_many_gone_recipients_are_deleted_25_requests_at_a_time(handler, monkeypatch):
    sender = connect(handler, "lobby")
    gone = [connect(handler, "lobby") for _ in range(30)]
    for connection in gone:
        handler.api.answer(connection.connection_id, 410)
    batch_sizes = []
    real_batch_write = handler.dynamodb.batch_write_item

    def recording_batch_write(**request):
        batch_sizes.append(len(request["RequestItems"][handler.TABLE_NAME]))
        return real_batch_write(**request)

    monkeypatch.setattr(handler.dynamodb, "batch_write_item", recording_batch_write)

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert reply["stale"] == 30
    assert batch_sizes == [25, 25, 10]  # 60 items: a membership and a connection each
    assert {item["connectionId"] for item in items(handler)} == {sender.connection_id}


def test_unprocessed_deletes_are_retried(handler, monkeypatch):
    sender, gone = connect(handler, "lobby"), connect(handler, "lobby")
    handler.api.answer(gone.connection_id, 410)
    requests = []
    real_batch_write = handler.dynamodb.batch_write_item

    def batch_write_leaving_one_unprocessed(**request):
        requests.append(request)
        (table_requests,) = request["RequestItems"].values()
        if len(requests) == 1:
            done = real_batch_write(RequestItems={handler.TABLE_NAME: table_requests[:1]})
            return {**done, "UnprocessedItems": {handler.TABLE_NAME: table_requests[1:]}}
        return real_batch_write(**request)

    monkeypatch.setattr(handler.dynamodb, "batch_write_item", batch_write_leaving_one_unprocessed)

    send(handler, sender, {"action": "message", "messageBody": "x"})

    assert len(requests) == 2
    assert {item["connectionId"] for item in items(handler)} == {sender.connection_id}


def test_a_throttled_post_is_retried_and_then_delivered(handler):
    sender, busy = connect(handler, "lobby"), connect(handler, "lobby")
    handler.api.answer(busy.connection_id, 429, 429, 200)

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["delivered"], reply["failed"]) == (1, 0)
    assert [post.status for post in handler.api.posts_to(busy.connection_id)] == [429, 429, 200]


def test_a_post_throttled_on_every_attempt_counts_as_failed(handler):
    sender, busy, fine = (connect(handler, "lobby") for _ in range(3))
    handler.api.answer(busy.connection_id, 429)

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["delivered"], reply["stale"], reply["failed"]) == (1, 0, 1)
    assert len(handler.api.posts_to(busy.connection_id)) == handler.POST_ATTEMPTS
    assert fine.connection_id in handler.api.delivered()
    # Throttled is not gone: the connection keeps its items.
    assert busy.connection_id in {item["connectionId"] for item in items(handler)}


def test_a_forbidden_post_counts_as_failed_is_logged_with_its_code_and_not_retried(handler, capsys):
    sender, denied, fine = (connect(handler, "lobby") for _ in range(3))
    handler.api.answer(denied.connection_id, 403)
    capsys.readouterr()

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["delivered"], reply["failed"]) == (1, 1)
    assert fine.connection_id in handler.api.delivered()
    assert len(handler.api.posts_to(denied.connection_id)) == 1
    (summary,) = [line for line in log_lines(capsys) if line["message"] == "broadcast"]
    assert summary["failures"] == {"ForbiddenException": 1}


def test_an_unreachable_management_api_counts_every_post_failed(handler, monkeypatch):
    monkeypatch.setattr(handler, "CALLBACK_URL", f"http://127.0.0.1:{closed_port()}/test")
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "x"})

    assert (reply["action"], reply["recipients"], reply["failed"]) == ("sent", 1, 1)


# --- message: the deadline ----------------------------------------------------------------


FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:broadcast"


class LambdaContext:
    """The parts of Lambda's context object the function reads (without an ARN,
    the function cannot name itself, so it cannot hand a broadcast on)."""

    def __init__(self, remaining_ms: int, invoked_function_arn: str | None = None) -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000
        if invoked_function_arn:
            self.invoked_function_arn = invoked_function_arn

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


@pytest.fixture
def slow_room(handler, monkeypatch):
    """A sender and 12 recipients; two posts at a time, 0.3 s each."""
    monkeypatch.setattr(handler, "fanout_pool", ThreadPoolExecutor(max_workers=2))
    handler.api.on_post = lambda post: time.sleep(0.3)
    sender = connect(handler, "lobby")
    recipients = [connect(handler, "lobby") for _ in range(12)]
    yield sender, recipients
    handler.fanout_pool.shutdown()


def test_with_time_left_a_broadcast_posts_to_everyone_and_says_nothing_of_deadlines(handler):
    sender = connect(handler, "lobby")
    others = [connect(handler, "lobby") for _ in range(3)]

    reply = send(
        handler, sender, {"action": "message", "messageBody": "x"}, context=LambdaContext(29_000)
    )

    assert (reply["delivered"], reply["failed"]) == (3, 0) and "complete" not in reply
    assert set(handler.api.delivered()) == {other.connection_id for other in others}


def test_without_time_to_post_before_the_function_times_out_every_recipient_counts_failed(
    handler, capsys
):
    sender, _, _ = (connect(handler, "lobby") for _ in range(3))

    reply = send(
        handler, sender, {"action": "message", "messageBody": "x"}, context=LambdaContext(1_500)
    )

    assert (reply["action"], reply["recipients"], reply["delivered"], reply["failed"]) == (
        "sent",
        2,
        0,
        2,
    )
    assert handler.api.posts == []
    (logged,) = [
        line
        for line in map(json.loads, capsys.readouterr().out.splitlines())
        if line["message"] == "broadcast"
    ]
    assert logged["failures"] == {"Deadline": 2}


def test_the_deadline_counts_from_when_api_gateway_received_the_frame(handler):
    """API Gateway stops waiting 29 s after the frame arrived, whatever the function's
    own timeout: a frame that waited 28 s for an execution environment is too late."""
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(
        handler,
        sender,
        {"action": "message", "messageBody": "x"},
        context=LambdaContext(29_000),
        requestTimeEpoch=events.now_ms() - 28_000,
    )

    assert (reply["delivered"], reply["failed"]) == (0, 1)
    assert handler.api.posts == []


def test_posts_that_would_end_past_the_deadline_are_not_started_and_count_failed(
    handler, slow_room
):
    """Two posts at a time, each taking 0.3 s, and 0.9 s to post in: the first few
    are delivered, the rest are not started, and the reply comes in time. (Without
    a function ARN in the context there is nobody to hand the rest to.)"""
    sender, _ = slow_room

    reply = send(
        handler, sender, {"action": "message", "messageBody": "x"}, context=LambdaContext(2_900)
    )

    assert reply["recipients"] == 12
    assert reply["delivered"] > 0 and reply["failed"] >= 4
    assert reply["delivered"] + reply["failed"] == 12
    assert len(handler.api.delivered()) == reply["delivered"]


def test_a_room_too_big_to_read_before_the_deadline_is_reported_incomplete(handler, monkeypatch):
    monkeypatch.setattr(handler, "FIRST_PAGE_SIZE", 2)
    monkeypatch.setattr(handler, "QUERY_PAGE_SIZE", 2)
    sender = connect(handler, "lobby")
    for _ in range(6):
        connect(handler, "lobby")

    reply = send(
        handler, sender, {"action": "message", "messageBody": "x"}, context=LambdaContext(0)
    )

    assert reply["action"] == "sent" and reply["complete"] is False
    assert reply["recipients"] < 6 and reply["failed"] == reply["recipients"]


# --- message: refused frames --------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [{"action": "message"}, {"action": "message", "messageBody": None}],
    ids=["missing", "null"],
)
def test_a_message_without_a_body_is_refused_with_400_and_sent_to_nobody(handler, frame):
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, frame)

    assert reply["statusCode"] == reply["status"] == 400
    assert reply["action"] == "error" and "messageBody" in reply["error"]
    assert handler.api.posts == []


def test_an_oversize_message_is_refused_with_413_and_sent_to_nobody(handler, monkeypatch):
    monkeypatch.setattr(handler, "MAX_MESSAGE_BYTES", 100)
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "é" * 50})  # 102 bytes

    assert reply["status"] == 413 and "100" in reply["error"]
    assert handler.api.posts == []


def test_a_message_exactly_at_the_size_limit_is_delivered(handler, monkeypatch):
    monkeypatch.setattr(handler, "MAX_MESSAGE_BYTES", 100)
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, {"action": "message", "messageBody": "x" * 98})  # "x…" = 100

    assert reply["delivered"] == 1


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("not json", "not valid JSON"),
        ('{"action": "message", "messageBody": NaN}', "not valid JSON"),
        ('{"action": "message", "messageBody": "\\ud800"}', "Unicode"),
        ('{"action": "message", "messageBody": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON"),
        ('{"action": "message", "messageBody": ' + "9" * 5000 + "}", "not valid JSON"),
        ('["action", "message"]', "JSON object"),
    ],
    ids=["not-json", "nan", "lone-surrogate", "deep-nesting", "huge-number", "array"],
)
def test_a_malformed_message_frame_gets_a_400_error_and_is_sent_to_nobody(handler, body, problem):
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")

    reply = send(handler, sender, body)

    assert reply["status"] == 400 and problem in reply["error"]
    assert handler.api.posts == []


# --- ping and $default ------------------------------------------------------------------


def test_ping_answers_pong_with_the_server_time_in_ms(handler):
    connection = connect(handler, "lobby")
    before = int(time.time() * 1000)

    reply = send(handler, connection, {"action": "ping"}, route_key="ping")

    assert reply["action"] == "pong"
    assert before <= reply["time"] <= int(time.time() * 1000)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"action": "sendmessage"}', "unknown action 'sendmessage'"),
        ('{"action": "Message"}', "unknown action 'Message'"),
        ('{"action": "$connect"}', "unknown action '$connect'"),
        ('{"messageBody": "hi"}', "no action"),
        ('{"action": 5}', "action must be a string"),
        ("hello", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("", "not valid JSON"),
    ],
)
def test_default_route_explains_the_problem_and_lists_valid_actions(handler, body, problem):
    connection = connect(handler, "lobby")

    reply = send(handler, connection, body, route_key="$default")

    assert reply["statusCode"] == 400
    assert reply["action"] == "error" and problem in reply["error"]
    assert reply["validActions"] == ["message", "ping"]


def test_a_valid_action_that_reached_default_is_explained(handler):
    connection = connect(handler, "lobby")
    reply = send(handler, connection, {"action": "message", "messageBody": 1}, route_key="$default")
    assert reply["status"] == 400 and "could not be routed to 'message'" in reply["error"]


def test_a_route_key_the_function_does_not_know_goes_to_default(handler):
    connection = connect(handler, "lobby")
    reply = send(handler, connection, '{"action": "chat"}', route_key="chat")
    assert reply["action"] == "error" and reply["validActions"] == ["message", "ping"]


# --- the callback endpoint ------------------------------------------------------------------


def test_callback_url_is_built_from_api_id_and_stage_not_the_custom_domain(handler, monkeypatch):
    monkeypatch.setattr(handler, "CALLBACK_URL", "")
    event = events.message(
        events.Connection(domain_name="chat.example.com", api_id="abc123defg", stage="prod"),
        "{}",
        "message",
    )
    assert (
        handler.callback_url(event) == "https://abc123defg.execute-api.us-east-1.amazonaws.com/prod"
    )


def test_callback_url_uses_the_china_domain_in_china_regions(handler, monkeypatch):
    monkeypatch.setattr(handler, "CALLBACK_URL", "")
    monkeypatch.setattr(handler, "AWS_REGION", "cn-north-1")
    event = events.message(events.Connection(api_id="abc123defg", stage="prod"), "{}", "message")
    assert (
        handler.callback_url(event)
        == "https://abc123defg.execute-api.cn-north-1.amazonaws.com.cn/prod"
    )


def test_callback_url_setting_overrides_the_built_url(handler, monkeypatch):
    monkeypatch.setattr(handler, "CALLBACK_URL", "http://127.0.0.1:8080/local/")
    event = events.message(events.Connection(api_id="abc123defg"), "{}", "message")
    assert handler.callback_url(event) == "http://127.0.0.1:8080/local"


# --- DynamoDB trouble -------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dynamodb_down(handler, monkeypatch):
    unreachable = boto3.client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        config=Config(connect_timeout=1, retries={"mode": "standard", "max_attempts": 1}),
    )
    connection = connect(handler, "lobby")
    monkeypatch.setattr(handler, "dynamodb", unreachable)
    return connection


def test_a_message_while_dynamodb_is_down_gets_a_500_reply_with_the_request_id(
    handler, dynamodb_down
):
    event = events.message(
        dynamodb_down, json.dumps({"action": "message", "messageBody": "x"}), "message"
    )

    response = handler.lambda_handler(event, None)

    reply = json.loads(response["body"])
    assert response["statusCode"] == 500
    assert reply["action"] == "error" and reply["requestId"] == event["requestContext"]["requestId"]
    assert "Traceback" not in response["body"]
    assert "ref" not in reply


def test_a_failed_message_reply_still_carries_its_ref(handler, dynamodb_down):
    frame = {"action": "message", "messageBody": "x", "ref": "m-7"}
    reply = send(handler, dynamodb_down, frame)
    assert (reply["status"], reply["ref"]) == (500, "m-7")


def test_a_connect_while_dynamodb_is_down_is_refused_with_500(handler, dynamodb_down):
    response = handler.lambda_handler(events.connect(events.Connection(), {"room": "x"}), None)
    assert response["statusCode"] == 500


def test_throttled_dynamodb_gets_a_503_reply(handler, dynamodb_down):
    stubber = Stubber(handler.dynamodb)
    stubber.add_client_error(
        "get_item", "ProvisionedThroughputExceededException", http_status_code=400
    )
    with stubber:
        frame = {"action": "message", "messageBody": "x", "ref": "m-8"}
        reply = send(handler, dynamodb_down, frame)
    assert reply["status"] == 503 and "retry" in reply["error"]
    assert reply["ref"] == "m-8"


# --- logs and metrics -------------------------------------------------------------------------


def log_lines(capsys) -> list[dict]:
    """Every stdout line, each of which must be one JSON object."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def test_every_log_line_is_json_with_route_connection_and_request_ids(handler, capsys):
    sender, _ = connect(handler, "lobby"), connect(handler, "lobby")
    send(handler, sender, {"action": "ping"}, route_key="ping")

    lines = log_lines(capsys)

    assert lines
    pong = lines[-1]
    assert pong["level"] == "INFO" and pong["route"] == "ping"
    assert pong["connectionId"] == sender.connection_id and pong["requestId"]


def test_a_broadcast_logs_one_emf_record_with_its_counts_and_no_message_body(handler, capsys):
    sender = connect(handler, "lobby")
    gone, _ = connect(handler, "lobby"), connect(handler, "lobby")
    handler.api.answer(gone.connection_id, 410)
    capsys.readouterr()

    send(handler, sender, {"action": "message", "messageBody": "secret-words-7f3a"})

    output = capsys.readouterr().out
    assert "secret-words-7f3a" not in output
    records = [json.loads(line) for line in output.splitlines() if '"_aws"' in line]
    assert len(records) == 1
    record = records[0]
    (directive,) = record["_aws"]["CloudWatchMetrics"]
    names = [metric["Name"] for metric in directive["Metrics"]]
    assert names == ["Recipients", "Delivered", "Stale", "Failed", "FanoutMs"]
    assert all(
        dimension in record for dimensions in directive["Dimensions"] for dimension in dimensions
    )
    assert (record["Recipients"], record["Delivered"], record["Stale"], record["Failed"]) == (
        2,
        1,
        1,
        0,
    )
    assert record["FanoutMs"] >= 0 and record["connectionId"] == sender.connection_id


def test_an_unexpected_error_is_logged_with_its_traceback_but_answered_without_it(
    handler, monkeypatch, capsys
):
    connection = connect(handler, "lobby")

    def broken(event, context):
        raise RuntimeError("boom")

    monkeypatch.setitem(handler.ROUTES, "ping", broken)
    capsys.readouterr()

    reply = send(handler, connection, {"action": "ping"}, route_key="ping")

    assert reply["status"] == 500 and "boom" not in json.dumps(reply)
    (error,) = [line for line in log_lines(capsys) if line["level"] == "ERROR"]
    assert "RuntimeError: boom" in error["exception"]


# --- anything a client can send ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
frames = st.one_of(
    st.text(),
    json_values.map(json.dumps),
    st.dictionaries(
        st.sampled_from(["action", "messageBody", "room", "from"]), json_values, max_size=4
    ).map(json.dumps),
    st.fixed_dictionaries({"action": st.just("message"), "messageBody": json_values}).map(
        json.dumps
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=frames, route_key=st.sampled_from(["message", "$default", "ping"]))
def test_any_frame_on_any_route_gets_a_well_formed_reply_never_an_internal_error(
    handler, body, route_key
):
    connection = events.Connection()  # not stored: a message gets 404 at worst

    response = handler.lambda_handler(events.message(connection, body, route_key), None)

    reply = json.loads(response["body"])
    assert response["statusCode"] in (200, 400, 404, 413)
    assert reply["action"] in ("error", "pong", "sent")
    if reply["action"] == "error":
        assert reply["status"] == response["statusCode"] and reply["error"]


# --- message: handing the rest of a big room on ---------------------------------------------


class FakeLambdaApi:
    """Records Invoke calls; raises `error` instead, when given one."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.error = error

    def invoke(self, **request) -> dict:
        if self.error:
            raise self.error
        self.calls.append(request)
        return {"StatusCode": 202}


def test_what_the_deadline_leaves_is_handed_to_an_asynchronous_invocation_that_finishes_it(
    handler, monkeypatch, slow_room
):
    sender, recipients = slow_room
    lambda_api = FakeLambdaApi()
    monkeypatch.setattr(handler, "lambda_api_cache", [lambda_api])

    reply = send(
        handler,
        sender,
        {"action": "message", "messageBody": "x", "ref": "r1"},
        context=LambdaContext(2_900, FUNCTION_ARN),
    )

    assert reply["continued"] is True and reply["ref"] == "r1"
    assert 0 < reply["delivered"] == reply["recipients"] < 12 and reply["failed"] == 0
    (request,) = lambda_api.calls
    assert (request["FunctionName"], request["InvocationType"]) == (FUNCTION_ARN, "Event")
    handoff = json.loads(request["Payload"])["handoff"]
    assert (handoff["id"], handoff["sender"], handoff["hop"]) == (
        reply["id"],
        sender.connection_id,
        1,
    )

    handler.lambda_handler(json.loads(request["Payload"]), LambdaContext(29_000, FUNCTION_ARN))

    delivered = handler.api.delivered()
    assert set(delivered) == {recipient.connection_id for recipient in recipients}
    assert {len(bodies) for bodies in delivered.values()} == {1}
    assert lambda_api.calls == [request]  # the second invocation had time for the rest


def test_a_hand_off_that_cannot_be_made_counts_the_rest_failed(handler, monkeypatch, slow_room):
    sender, _ = slow_room
    refused = ClientError({"Error": {"Code": "AccessDeniedException"}}, "Invoke")
    monkeypatch.setattr(handler, "lambda_api_cache", [FakeLambdaApi(refused)])

    reply = send(
        handler,
        sender,
        {"action": "message", "messageBody": "x"},
        context=LambdaContext(2_900, FUNCTION_ARN),
    )

    assert "continued" not in reply and reply["recipients"] == 12
    assert reply["failed"] > 0 and reply["delivered"] + reply["failed"] == 12


def test_hand_offs_stop_after_max_handoffs_and_count_the_rest_failed(handler, monkeypatch, capsys):
    sender = connect(handler, "lobby")
    others = [connect(handler, "lobby") for _ in range(3)]
    lambda_api = FakeLambdaApi()
    monkeypatch.setattr(handler, "lambda_api_cache", [lambda_api])
    handoff = {
        "room": "lobby",
        "sender": sender.connection_id,
        "id": "m-1",
        "stage": "local",
        "callbackUrl": handler.api.url,
        "payload": '{"action":"message","messageBody":"x"}',
        "after": None,
        "hop": handler.MAX_HANDOFFS,
    }
    capsys.readouterr()

    handler.lambda_handler({"handoff": handoff}, LambdaContext(0, FUNCTION_ARN))

    assert lambda_api.calls == [] and handler.api.posts == []
    (logged,) = [
        line
        for line in map(json.loads, capsys.readouterr().out.splitlines())
        if line["message"] == "broadcast"
    ]
    assert (logged["id"], logged["hop"], logged["Failed"]) == (
        "m-1",
        handler.MAX_HANDOFFS,
        len(others),
    )
    assert logged["failures"] == {"Deadline": len(others)}
