"""Faults, survived: DynamoDB going away and coming back, a Lambda worker killed in
the middle of a broadcast. The unchanged Lambda on the local stack, real sockets."""

from __future__ import annotations

import json
import signal
import time
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import websocket

from tests.local_harness import connect, reply_to, wait_for
from tests.tcp_proxy import Proxy

HANDLER = "lambda_function.lambda_handler"


# --- DynamoDB outage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def outage(stack_factory: Any, moto_endpoint: str) -> tuple[Any, Proxy]:
    """A stack whose DynamoDB (moto's server) is reached through a proxy we can cut."""
    target = urlsplit(moto_endpoint)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 80)
    started, _ = stack_factory(handler=HANDLER, dynamodb=proxy.url)
    yield started, proxy
    proxy.cut()


def test_while_dynamodb_is_down_senders_get_500_with_a_request_id_and_connects_are_refused(
    outage: tuple[Any, Proxy],
) -> None:
    stack, proxy = outage
    sender = connect(f"{stack.ws_url}?room=outage")
    recipient = connect(f"{stack.ws_url}?room=outage")
    assert reply_to(sender, {"action": "message", "messageBody": "before"})["delivered"] == 1
    assert json.loads(recipient.recv())["messageBody"] == "before"

    proxy.cut()
    try:
        reply = reply_to(sender, {"action": "message", "messageBody": "during"})
        assert (reply["action"], reply["status"]) == ("error", 500)
        assert len(reply["requestId"]) == 16
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            connect(f"{stack.ws_url}?room=outage")
        assert refused.value.status_code == 500
        # Nothing crashed: what needs no table still works, and nothing was delivered.
        assert reply_to(sender, {"action": "ping"})["action"] == "pong"
        recipient.settimeout(0.5)
        with pytest.raises(websocket.WebSocketTimeoutException):
            recipient.recv()
        recipient.settimeout(10)
    finally:
        proxy.restore()

    # Back without a restart: the same connections and new ones work.
    reply = wait_for(
        lambda: (
            (r := reply_to(sender, {"action": "message", "messageBody": "after"}))["action"]
            == "sent"
            and r
        ),
        timeout=30,
        what="broadcasts to work again",
    )
    assert reply["delivered"] == 1
    assert json.loads(recipient.recv())["messageBody"] == "after"
    newcomer = connect(f"{stack.ws_url}?room=outage")
    assert reply_to(newcomer, {"action": "message", "messageBody": "hello"})["delivered"] == 2
    assert stack.process.poll() is None


# --- A worker killed mid-invocation -------------------------------------------------------


def lambda_workers(stack: Any) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(stack.pid).children(recursive=True)
        if "local.runtime" in " ".join(child.cmdline())
    ]


def test_a_worker_killed_mid_broadcast_answers_internal_server_error_and_is_replaced(
    stack_factory: Any,
) -> None:
    # Each post takes 300 ms and there is one worker: the broadcast is still running
    # when its worker is killed.
    stack, _ = stack_factory(handler=HANDLER, concurrency=1, post_latency_ms=300)
    sender = connect(f"{stack.ws_url}?room=killed")
    others = [connect(f"{stack.ws_url}?room=killed") for _ in range(3)]
    (worker,) = lambda_workers(stack)

    sender.send(json.dumps({"action": "message", "messageBody": "doomed"}))
    time.sleep(0.15)  # inside the 300 ms of the first posts
    worker.send_signal(signal.SIGKILL)

    error = json.loads(sender.recv())
    assert error["message"] == "Internal server error" and error["requestId"]
    replacement = wait_for(lambda: lambda_workers(stack), what="a replacement worker")[0]
    assert replacement.pid != worker.pid
    # Nothing hangs: the next broadcast reaches everybody.
    reply = reply_to(sender, {"action": "message", "messageBody": "again"})
    assert (reply["action"], reply["delivered"]) == ("sent", 3)
    for other in others:
        bodies = []
        while "again" not in bodies:
            bodies.append(json.loads(other.recv())["messageBody"])


# --- A room too big for one invocation ----------------------------------------------------


def test_a_broadcast_that_cannot_finish_in_time_answers_in_time_and_hands_on_the_rest(
    stack_factory: Any,
) -> None:
    """Two posts at a time, 300 ms each, and a function timeout of 4 s: 30 recipients
    would need 4.5 s. The Lambda stops starting posts 2 s before its timeout,
    answers the sender in time, and hands the rest of the room to an asynchronous
    invocation of itself (through the emulator's Lambda Invoke API), so everyone
    gets the message, once."""
    stack, _ = stack_factory(
        handler=HANDLER,
        function_timeout=4,
        post_latency_ms=300,
        env={"FANOUT_CONCURRENCY": "2"},
    )
    room = [connect(f"{stack.ws_url}?room=crowded") for _ in range(31)]
    sender, recipients = room[0], room[1:]

    reply = reply_to(sender, {"action": "message", "messageBody": "to all of you?"})

    assert reply["action"] == "sent", reply
    assert reply["continued"] is True
    assert 0 < reply["delivered"] == reply["recipients"] < 30
    for recipient in recipients:
        recipient.settimeout(30)
        assert json.loads(recipient.recv())["messageBody"] == "to all of you?"
    time.sleep(1)  # for a second copy, if there were one, to arrive
    for recipient in recipients:
        recipient.settimeout(0.05)
        with pytest.raises(websocket.WebSocketTimeoutException):
            recipient.recv()
