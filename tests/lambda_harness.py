"""Fixtures for the Lambda's unit tests: a moto table made from template.json,
a scripted management API on loopback, and helpers that drive the handler with
events built by local/events.py (the same builder the emulator uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import boto3.dynamodb.types
import pytest
from moto import mock_aws

from local import events, template
from tests.management_api import ManagementApi, serve


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The lambda_function module over a fresh moto table, with its callback URL
    pointed at a scripted management API (`handler.api`)."""
    with mock_aws():
        import lambda_function

        template.create_table(boto3.client("dynamodb"), lambda_function.TABLE_NAME)
        keys = lambda_function.signing_keys()
        api = ManagementApi(secrets={keys.access_key: keys.secret_key})
        server = serve(api)
        monkeypatch.setattr(lambda_function, "CALLBACK_URL", api.url)
        monkeypatch.setattr(lambda_function, "POST_BACKOFF_SECONDS", 0.001)
        lambda_function.management_apis.clear()
        lambda_function.api = api  # type: ignore[attr-defined]
        try:
            yield lambda_function
        finally:
            server.shutdown()
            server.server_close()
            lambda_function.management_apis.clear()
            del lambda_function.api  # type: ignore[attr-defined]


def connect(
    handler: Any, room: str | None = "lobby", *, age: float = 60.0, **query: str
) -> events.Connection:
    """Open a connection through $connect and return it; fails the test if refused.
    It was opened `age` seconds ago: by default an established connection, long past
    the window in which a connection still in its $connect answers 410."""
    connection = events.Connection(
        domain_name="abc123defg.execute-api.us-east-1.amazonaws.com",
        connected_at=events.now_ms() - int(age * 1000),
    )
    if room is not None:
        query = {"room": room, **query}
    response = handler.lambda_handler(events.connect(connection, query), None)
    assert response["statusCode"] == 200, response
    return connection


def send(
    handler: Any,
    connection: events.Connection,
    frame: Any,
    route_key: str = "message",
    context: Any = None,
    **request_context: Any,
) -> dict:
    """Send one frame on a route, with this Lambda context and these requestContext
    fields changed; return the reply body the sender would get."""
    body = frame if isinstance(frame, str) else json.dumps(frame)
    event = events.message(connection, body, route_key)
    event["requestContext"].update(request_context)
    response = handler.lambda_handler(event, context)
    return {"statusCode": response["statusCode"], **json.loads(response["body"])}


def items(handler: Any) -> list[dict[str, Any]]:
    """Every item of the table, in plain (deserialised) form."""
    scanned = handler.dynamodb.scan(TableName=handler.TABLE_NAME, ConsistentRead=True)["Items"]
    deserialize = boto3.dynamodb.types.TypeDeserializer().deserialize
    return [{key: deserialize(value) for key, value in item.items()} for item in scanned]
