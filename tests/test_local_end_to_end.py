"""The real lambda_function.py, unchanged, on the local stack: real WebSockets, real
worker processes, moto's server over HTTP, the Lambda's own signed posts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.local_harness import connect, wait_for

if not (Path(__file__).resolve().parent.parent / "lambda_function.py").exists():
    pytest.skip("lambda_function.py is not there yet", allow_module_level=True)

HANDLER = "lambda_function.lambda_handler"


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


def test_a_connection_whose_disconnect_was_lost_is_cleaned_by_the_next_broadcast(
    broadcast: Any,
) -> None:
    sender, ghost = join(broadcast, "e2e-ghost"), join(broadcast, "e2e-ghost")
    send(ghost, {"action": "message", "messageBody": "hello"})
    ghost_id = json.loads(sender.recv())["from"]
    broadcast.lose_disconnect(ghost_id)
    ghost.close()
    assert ghost_id in members(broadcast, "e2e-ghost")  # nothing told the Lambda it left

    sent = send(sender, {"action": "message", "messageBody": "anyone?"})

    assert (sent["recipients"], sent["delivered"], sent["stale"]) == (1, 0, 1)
    assert ghost_id not in members(broadcast, "e2e-ghost")
