"""Fuzzing the protocol over real sockets: the unchanged Lambda on the local stack.

Whatever a client sends, it gets an `error` reply (or a normal one, if the frame
happened to be valid) or the close code API Gateway gives for that frame; never
API Gateway's bare "Internal server error"; and the other clients of the room are
served throughout. Bad room names in the handshake are refused with 400 and
leave nothing in the table.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.local_harness import close_frame, connect, next_reply

HANDLER = "lambda_function.lambda_handler"
ROOM = "fuzz"
FRAME_LIMIT = 32 * 1024
REPLY_ACTIONS = {"error", "sent", "pong"}


@pytest.fixture(scope="module")
def fuzz_stack(stack_factory: Any) -> Any:
    return stack_factory(handler=HANDLER, concurrency=2)[0]


@pytest.fixture(scope="module")
def bystanders(fuzz_stack: Any) -> tuple[websocket.WebSocket, websocket.WebSocket]:
    """Two well-behaved clients in the fuzzed room: one talks, one listens."""
    return connect(f"{fuzz_stack.ws_url}?room={ROOM}"), connect(f"{fuzz_stack.ws_url}?room={ROOM}")


@pytest.fixture(scope="module")
def fuzzer(fuzz_stack: Any) -> websocket.WebSocket:
    """The fuzzing client: frames within API Gateway's limits never close it."""
    return connect(f"{fuzz_stack.ws_url}?room={ROOM}")


def bystanders_still_served(bystanders: tuple[websocket.WebSocket, websocket.WebSocket]) -> None:
    speaker, listener = bystanders
    marker = {"still": "served"}
    speaker.send(json.dumps({"action": "message", "messageBody": marker}))
    assert next_reply(speaker)["action"] == "sent"
    # The listener may first see what the fuzzer broadcast into the room.
    while True:
        received = json.loads(listener.recv())
        if received.get("messageBody") == marker:
            return


# --- What a fuzzer sends -----------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
field_values = json_values | st.sampled_from(["message", "ping", "$default", "$connect", ""])
frames = st.one_of(
    # Arbitrary text, including control characters and every plane of Unicode.
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300),
    # Arbitrary JSON.
    json_values.map(json.dumps),
    # Our fields, with wrong types and unknown actions.
    st.dictionaries(
        st.sampled_from(["action", "messageBody", "room", "from", "id", "token"]),
        field_values,
        max_size=5,
    ).map(json.dumps),
    # Frames that stress the parser.
    st.integers(min_value=1, max_value=(FRAME_LIMIT - 64) // 2).map(
        lambda depth: '{"action":"message","messageBody":' + "[" * depth + "]" * depth + "}"
    ),
    st.integers(min_value=300, max_value=6000).map(
        lambda digits: '{"action":"message","messageBody":' + "7" * digits + "}"
    ),
    st.sampled_from(
        [
            "",
            "{}",
            "null",
            '{"action":"message","messageBody":NaN}',
            '{"action":"message","messageBody":1e999}',
            '{"action":"message","messageBody":"\\ud800"}',
            '{"action":"message","messageBody":"\\u0000"}',
            '{"action":"message"',
            '{"action":["message"]}',
            '{"action":"message","action":"ping"}',
        ]
    ),
)


def reply_to(ws: websocket.WebSocket, frame: str) -> dict[str, Any]:
    ws.send(frame)
    reply = next_reply(ws)
    assert reply.get("message") != "Internal server error", (frame[:200], reply)
    return reply


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames)
def test_any_text_frame_gets_a_well_formed_reply_never_an_internal_error(
    fuzzer: websocket.WebSocket, bystanders: Any, frame: str
) -> None:
    reply = reply_to(fuzzer, frame)

    assert reply["action"] in REPLY_ACTIONS, reply
    if reply["action"] == "error":
        assert reply["status"] in (400, 413) and reply["error"], reply
        assert reply["validActions"] == ["message", "ping"]
    # The connection survives a bad frame: it can still talk.
    assert reply_to(fuzzer, '{"action":"ping"}')["action"] == "pong"
    bystanders_still_served(bystanders)


def test_a_frame_that_looks_valid_but_nests_too_deep_is_refused(fuzz_stack: Any) -> None:
    ws = connect(f"{fuzz_stack.ws_url}?room={ROOM}")
    depth = (FRAME_LIMIT - 64) // 2
    reply = reply_to(ws, '{"action":"message","messageBody":' + "[" * depth + "]" * depth + "}")
    assert (reply["action"], reply["status"]) == ("error", 400)


def test_a_number_python_parses_but_json_cannot_carry_is_refused(fuzz_stack: Any) -> None:
    ws = connect(f"{fuzz_stack.ws_url}?room={ROOM}")
    # Python refuses to convert integers of more than 4,300 digits (CVE-2020-10735).
    reply = reply_to(ws, '{"action":"message","messageBody":1' + "0" * 5000 + "}")
    assert (reply["action"], reply["status"]) == ("error", 400)


@pytest.mark.parametrize(
    ("opcode", "payload", "code"),
    [
        (websocket.ABNF.OPCODE_BINARY, b'{"action":"ping"}', 1003),
        (websocket.ABNF.OPCODE_BINARY, b"", 1003),
        (websocket.ABNF.OPCODE_TEXT, b"x" * (FRAME_LIMIT + 1), 1009),
        (websocket.ABNF.OPCODE_TEXT, b'{"action":"message","messageBody":"\xff\xfe"}', 1007),
    ],
    ids=["binary", "empty-binary", "oversize-frame", "invalid-utf8"],
)
def test_frames_api_gateway_refuses_close_the_connection_with_its_code(
    fuzz_stack: Any, bystanders: Any, opcode: int, payload: bytes, code: int
) -> None:
    ws = connect(f"{fuzz_stack.ws_url}?room={ROOM}")
    ws.send(payload, opcode)
    assert close_frame(ws)[0] == code
    bystanders_still_served(bystanders)


# --- Room names in the handshake ----------------------------------------------------------


def table_keys(stack: Any) -> set[tuple[str, str]]:
    items = stack.dynamodb_client().scan(TableName=stack.table_name, ConsistentRead=True)["Items"]
    return {(item["PK"]["S"], item["connectionId"]["S"]) for item in items}


@pytest.mark.parametrize(
    "query",
    [
        "room=" + quote("1#CONN#x"),
        "room=" + quote("ROOM#1"),
        "room=" + quote("../"),
        "room=" + quote("café"),
        "room=" + "r" * 65,
        "room=",
        "room=a&room=b",
        "room=" + quote("a b"),
        "room=" + quote("lobby\n"),
    ],
    ids=[
        "conn-key",
        "room-key",
        "dot-dot",
        "unicode",
        "65-chars",
        "empty",
        "repeated",
        "space",
        "newline",
    ],
)
def test_a_bad_room_name_is_refused_with_400_and_stores_nothing(
    fuzz_stack: Any, query: str
) -> None:
    before = table_keys(fuzz_stack)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(f"{fuzz_stack.ws_url}?{query}")
    assert refused.value.status_code == 400
    # Earlier tests' connections may still be leaving; nothing may arrive.
    assert table_keys(fuzz_stack) <= before
