"""Lambda proxy events shaped exactly like API Gateway's WebSocket events.

One builder for everybody: the emulator builds the events it hands the Lambda
with it, and the tests build theirs with it, so a unit test's event is the
event the handler gets on the local stack, and both match real captures
(which keys exist per event type, id formats, milliseconds, headers).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_API_ID = "local00api"
DEFAULT_STAGE = "local"

# $disconnect always carries this fixed header set, whatever the handshake sent.
_DISCONNECT_HEADERS = ("x-api-key", "X-Forwarded-For", "x-restapi")

# Close codes without a close frame status: API Gateway fills in this reason.
NO_STATUS_REASON = "Client-side close frame status not set"


def new_id() -> str:
    """An id in API Gateway's format: URL-safe base64 of 12 random bytes, 16 characters,
    ending in '=' (connection ids, request ids and message ids all look like this)."""
    return base64.urlsafe_b64encode(os.urandom(12)).decode()[:-1] + "="


def trace_id(now_seconds: float | None = None) -> str:
    """An X-Amzn-Trace-Id value: Root=1-<8 hex epoch seconds>-<24 hex random>."""
    seconds = int(now_seconds if now_seconds is not None else time.time())
    return f"Root=1-{seconds:08x}-{os.urandom(12).hex()}"


def now_ms() -> int:
    return int(time.time() * 1000)


def request_time(epoch_ms: int) -> str:
    """CLF time as API Gateway writes it: 11/Nov/2024:13:45:46 +0000."""
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(epoch_ms / 1000))


@dataclass
class Connection:
    """What API Gateway knows about one WebSocket connection; every event of the
    connection repeats it."""

    source_ip: str = "203.0.113.7"
    user_agent: str | None = None
    domain_name: str = "127.0.0.1:8080"
    stage: str = DEFAULT_STAGE
    api_id: str = DEFAULT_API_ID
    connection_id: str = field(default_factory=new_id)
    connected_at: int = field(default_factory=now_ms)

    def identity(self) -> dict[str, str]:
        identity = {"sourceIp": self.source_ip}
        if self.user_agent is not None:
            identity["userAgent"] = self.user_agent
        return identity


def _request_context(
    connection: Connection, route_key: str, event_type: str, epoch_ms: int
) -> dict[str, Any]:
    request_id = new_id()
    return {
        "routeKey": route_key,
        "eventType": event_type,
        "extendedRequestId": request_id,
        "requestTime": request_time(epoch_ms),
        "messageDirection": "IN",
        "stage": connection.stage,
        "connectedAt": connection.connected_at,
        "requestTimeEpoch": epoch_ms,
        "identity": connection.identity(),
        "requestId": request_id,
        "domainName": connection.domain_name,
        "connectionId": connection.connection_id,
        "apiId": connection.api_id,
    }


def _single_and_multi(
    pairs: Iterable[tuple[str, str]],
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """API Gateway's two views of repeated keys: the last value, and all of them."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for key, value in pairs:
        single[key] = value
        multi.setdefault(key, []).append(value)
    return single, multi


def connect(
    connection: Connection,
    query: Iterable[tuple[str, str]] | dict[str, str] | None = None,
    headers: Iterable[tuple[str, str]] | dict[str, str] | None = None,
    *,
    request_time_epoch: int | None = None,
) -> dict[str, Any]:
    """A $connect event. `headers` are the client's handshake headers (client casing);
    API Gateway adds the X-Forwarded-* and trace headers and drops Connection/Upgrade.
    `queryStringParameters` exists only when the URL had a query string."""
    epoch_ms = request_time_epoch if request_time_epoch is not None else connection.connected_at
    header_pairs = list(headers.items() if isinstance(headers, dict) else headers or [])
    if not any(name.lower() == "host" for name, _ in header_pairs):
        header_pairs.insert(0, ("Host", connection.domain_name))
    header_pairs = [
        (name, value)
        for name, value in header_pairs
        if name.lower() not in {"connection", "upgrade", "content-length"}
    ]
    header_pairs += [
        ("X-Amzn-Trace-Id", trace_id(epoch_ms / 1000)),
        ("X-Forwarded-For", connection.source_ip),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Proto", "https"),
    ]
    single_headers, multi_headers = _single_and_multi(header_pairs)
    event: dict[str, Any] = {"headers": single_headers, "multiValueHeaders": multi_headers}
    query_pairs = list(query.items() if isinstance(query, dict) else query or [])
    if query_pairs:
        single_query, multi_query = _single_and_multi(query_pairs)
        event["queryStringParameters"] = single_query
        event["multiValueQueryStringParameters"] = multi_query
    event["requestContext"] = _request_context(connection, "$connect", "CONNECT", epoch_ms)
    event["isBase64Encoded"] = False
    return event


def message(
    connection: Connection,
    body: str,
    route_key: str,
    *,
    request_time_epoch: int | None = None,
) -> dict[str, Any]:
    """A MESSAGE event: no headers, no query string, the frame text as `body`, and a
    `messageId` (only message events carry one)."""
    epoch_ms = request_time_epoch if request_time_epoch is not None else now_ms()
    context = _request_context(connection, route_key, "MESSAGE", epoch_ms)
    context = {"routeKey": route_key, "messageId": new_id(), **context}
    return {"requestContext": context, "body": body, "isBase64Encoded": False}


def disconnect(
    connection: Connection,
    status_code: int = 1005,
    reason: str = NO_STATUS_REASON,
    *,
    request_time_epoch: int | None = None,
) -> dict[str, Any]:
    """A $disconnect event, with the fixed synthetic headers and the close code and
    reason API Gateway reports."""
    epoch_ms = request_time_epoch if request_time_epoch is not None else now_ms()
    headers = {"Host": connection.domain_name, **{name: "" for name in _DISCONNECT_HEADERS}}
    context = _request_context(connection, "$disconnect", "DISCONNECT", epoch_ms)
    context = {
        "routeKey": "$disconnect",
        "disconnectStatusCode": status_code,
        **context,
        "disconnectReason": reason,
    }
    return {
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "requestContext": context,
        "isBase64Encoded": False,
    }
