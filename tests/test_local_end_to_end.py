"""The real lambda_function.py, unchanged, on the local stack: real WebSockets, real
worker processes, the Lambda's own signed posts. Every test runs twice: over moto's
server and over Amazon's DynamoDB Local, which differ where the handler must not
(a Query whose last page is exactly full has a LastEvaluatedKey on DynamoDB Local
only)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import websocket

import lambda_function
from tests.local_harness import StackFactory, connect, reply_to, wait_for

HANDLER = "lambda_function.lambda_handler"


@pytest.fixture(scope="module", params=["moto", "dynamodb-local"])
def stack_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Stacks over moto's server, then over DynamoDB Local (skipped, saying why,
    where Java or npm is missing)."""
    endpoint_fixture = {"moto": "moto_endpoint", "dynamodb-local": "dynamodb_local_endpoint"}
    endpoint = request.getfixturevalue(endpoint_fixture[request.param])
    factory = StackFactory(endpoint, tmp_path_factory.mktemp("stacks"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def broadcast(stack_factory: Any) -> Any:
    return stack_factory(handler=HANDLER)[0]


def join(stack: Any, room: str) -> websocket.WebSocket:
    return connect(f"{stack.ws_url}?room={room}")


def send(ws: websocket.WebSocket, frame: dict[str, Any]) -> dict[str, Any]:
    ws.send(json.dumps(frame))
    return json.loads(ws.recv())


def members(stack: Any, room: str) -> set[str]:
    items = stack.dynamodb_client().query(
        TableName=stack.table_name,
        KeyConditionExpression="PK = :room",
        ExpressionAttributeValues={":room": {"S": f"ROOM#{room}"}},
        ConsistentRead=True,
    )["Items"]
    return {item["connectionId"]["S"] for item in items}


def test_a_message_reaches_everyone_else_in_the_room_and_nobody_outside(broadcast: Any) -> None:
    sender, first, second = (join(broadcast, "e2e-room") for _ in range(3))
    outsider = join(broadcast, "e2e-elsewhere")
    sent = send(sender, {"action": "message", "messageBody": {"text": "hi"}})
    assert sent["action"] == "sent"
    assert (sent["recipients"], sent["delivered"], sent["stale"], sent["failed"]) == (2, 2, 0, 0)
    for recipient in (first, second):
        received = json.loads(recipient.recv())
        assert (received["action"], received["room"], received["messageBody"]) == (
            "message",
            "e2e-room",
            {"text": "hi"},
        )
        assert received["id"] == sent["id"]
    outsider.settimeout(0.3)
    with pytest.raises(websocket.WebSocketTimeoutException):
        outsider.recv()


def test_ping_is_answered_with_pong(broadcast: Any) -> None:
    ws = join(broadcast, "e2e-ping")
    assert send(ws, {"action": "ping"})["action"] == "pong"


def test_an_unknown_action_is_answered_with_an_error(broadcast: Any) -> None:
    ws = join(broadcast, "e2e-error")
    reply = send(ws, {"action": "dance"})
    assert (reply["action"], reply["status"]) == ("error", 400)


def test_a_bad_room_name_rejects_the_handshake_with_400(broadcast: Any) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as rejected:
        join(broadcast, "not%20valid!")
    assert rejected.value.status_code == 400


def test_a_closed_connection_leaves_its_room(broadcast: Any) -> None:
    ws = join(broadcast, "e2e-leave")
    wait_for(lambda: len(members(broadcast, "e2e-leave")) == 1, what="the connection in its room")
    ws.close()
    wait_for(lambda: not members(broadcast, "e2e-leave"), what="the room to be empty")


def test_a_broadcast_reads_every_page_of_a_room_and_stops_at_a_full_last_page(
    broadcast: Any,
) -> None:
    """The first Query page holds FIRST_PAGE_SIZE members: with one more the room
    spans two pages; with exactly that many the last page is full, which DynamoDB
    Local follows with a LastEvaluatedKey and an empty page and moto does not."""
    page = lambda_function.FIRST_PAGE_SIZE
    room = [join(broadcast, "e2e-pages") for _ in range(page + 1)]
    sender, leaver, listeners = room[0], room[1], room[2:]

    sent = reply_to(sender, {"action": "message", "messageBody": "two pages"})
    assert (sent["recipients"], sent["delivered"]) == (page, page)

    leaver.close()
    wait_for(lambda: len(members(broadcast, "e2e-pages")) == page, what="the leaver gone")
    sent = reply_to(sender, {"action": "message", "messageBody": "one full page"})
    assert (sent["recipients"], sent["delivered"]) == (page - 1, page - 1)

    for listener in listeners:
        bodies = [json.loads(listener.recv())["messageBody"] for _ in range(2)]
        assert bodies == ["two pages", "one full page"]
    for ws in room:
        ws.close()


@pytest.fixture(scope="module")
def no_connect_window(stack_factory: Any) -> Any:
    """A stack whose Lambda deletes any connection answering 410, however young (by
    default one younger than 30 s may still be in its $connect, and is kept)."""
    return stack_factory(handler=HANDLER, env={"CONNECT_WINDOW_SECONDS": "0"})[0]


def test_a_connection_whose_disconnect_was_lost_is_cleaned_by_the_next_broadcast(
    no_connect_window: Any,
) -> None:
    broadcast = no_connect_window
    sender, ghost = join(broadcast, "e2e-ghost"), join(broadcast, "e2e-ghost")
    send(ghost, {"action": "message", "messageBody": "hello"})
    ghost_id = json.loads(sender.recv())["from"]
    broadcast.lose_disconnect(ghost_id)
    ghost.close()
    assert ghost_id in members(broadcast, "e2e-ghost")  # nothing told the Lambda it left

    sent = send(sender, {"action": "message", "messageBody": "anyone?"})

    assert (sent["recipients"], sent["delivered"], sent["stale"]) == (1, 0, 1)
    assert ghost_id not in members(broadcast, "e2e-ghost")


def join_during_broadcasts(stack: Any, room: str, newcomers: int) -> list[websocket.WebSocket]:
    """`newcomers` connections joining `room` one after another while two members
    broadcast without pause; all of them, the two speakers first (keep them: a
    socket that is garbage collected closes, and leaves the room)."""
    speakers = [join(stack, room) for _ in range(2)]
    talking = threading.Event()
    talking.set()

    def keep_talking(speaker: websocket.WebSocket) -> None:
        while talking.is_set():
            reply_to(speaker, {"action": "message", "messageBody": "busy room"})

    talkers = [threading.Thread(target=keep_talking, args=(s,), daemon=True) for s in speakers]
    for talker in talkers:
        talker.start()
    try:
        return speakers + [join(stack, room) for _ in range(newcomers)]
    finally:
        talking.clear()
        for talker in talkers:
            talker.join(timeout=30)


@pytest.fixture(scope="module")
def slow_handoff(stack_factory: Any) -> Any:
    """API Gateway opens a connection a moment after its $connect returned; here 300 ms,
    during which posts to it get 410 though its items are stored."""
    return stack_factory(handler=HANDLER, connect_latency_ms=300)[0]


def test_members_joining_during_broadcasts_stay_in_their_room(slow_handoff: Any) -> None:
    """The broadcasts that find a newcomer still opening get 410 from it; they must
    not delete its items, or it ends up connected in no room, receiving nothing."""
    speakers_and_newcomers = join_during_broadcasts(slow_handoff, "e2e-joining", newcomers=6)

    assert len(members(slow_handoff, "e2e-joining")) == 8
    listener = join(slow_handoff, "e2e-joining")
    assert reply_to(listener, {"action": "message", "messageBody": "everyone?"})["delivered"] == 8
    for newcomer in speakers_and_newcomers[2:]:
        newcomer.settimeout(10)
        while json.loads(newcomer.recv())["messageBody"] != "everyone?":
            pass


def test_without_the_connect_window_the_same_race_strands_newcomers(stack_factory: Any) -> None:
    """What the window prevents (and proof that the test above meets the race)."""
    stack = stack_factory(
        handler=HANDLER, connect_latency_ms=300, env={"CONNECT_WINDOW_SECONDS": "0"}
    )[0]

    connections = join_during_broadcasts(stack, "e2e-stranded", newcomers=6)

    assert len(connections) == 8
    assert len(members(stack, "e2e-stranded")) < 8
