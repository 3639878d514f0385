"""A serverless WebSocket broadcast API: the whole Lambda function.

API Gateway invokes this one function for every route of the WebSocket API and
`lambda_handler` dispatches on `requestContext.routeKey`:

    $connect     join a room: store the connection in DynamoDB
    $disconnect  leave it: delete what $connect stored
    message      broadcast `messageBody` to every other connection in the room
    ping         answer `pong` (a client's way to beat the 10-minute idle timeout)
    $default     anything else: an error naming the valid actions

A room too big to post to before the sender's reply is due is finished by
further invocations of this same function, which it invokes itself (hand-offs).

The file reads in the order a request flows through it: configuration, clients
(created once per container), the dispatcher, one function per route, then the
helpers the routes use (rooms, the broadcast, DynamoDB writes, replies, logs).

The table holds two items per connection (the README's "The table" says why):

    membership  PK = ROOM#<room>  connectionId = <id>   connectedAt, expiresAt
    connection  PK = CONN#<id>    connectionId = <id>   room, connectedAt, sourceIp, expiresAt

Standard library and boto3 only: both ship in the Lambda runtime, so the
deployment package is this file alone.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import os
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, NamedTuple
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.httpsession import get_cert_path

# --- Configuration -------------------------------------------------------------------

TABLE_NAME = os.environ.get("TABLE_NAME", "")
DEFAULT_ROOM = os.environ.get("DEFAULT_ROOM", "1")
MAX_MESSAGE_BYTES = int(os.environ.get("MAX_MESSAGE_BYTES", "32768"))
FANOUT_CONCURRENCY = int(os.environ.get("FANOUT_CONCURRENCY", "32"))
# Empty: built from each event's apiId and stage (see `callback_url`).
CALLBACK_URL = os.environ.get("CALLBACK_URL", "")
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
AWS_REGION = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
# "none": open rooms. "token": $connect needs ?token=, signed with the secret
# stored in Secrets Manager under AUTH_SECRET_ARN (see `mint_room_token`).
AUTH_MODE = os.environ.get("AUTH_MODE", "none")
AUTH_SECRET_ARN = os.environ.get("AUTH_SECRET_ARN", "")
# A connection answers 410 Gone while its $connect is still running, though its
# items are already written: one that joined less than this many seconds ago may
# be about to open, so its 410 does not get its items deleted (API Gateway gives
# up on a $connect after 29 s). Later broadcasts, or the TTL, remove it if gone.
CONNECT_WINDOW_SECONDS = float(os.environ.get("CONNECT_WINDOW_SECONDS", "30"))

# A room name is 1 to 64 of these characters. No '#', so a room can never forge
# another item's partition key.
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# API Gateway closes every connection after 2 hours; a $disconnect is best effort.
# The TTL removes the items of a connection whose $disconnect was lost, with a
# margin for DynamoDB's lazy TTL sweeper to never delete a live connection.
CONNECTION_TTL_SECONDS = 2 * 3600 + 15 * 60

# The table's attributes (template.json defines the same keys and TTL).
PARTITION_KEY = "PK"
SORT_KEY = "connectionId"
TTL_ATTRIBUTE = "expiresAt"

# The management API's 429 (throttled, or the recipient's buffer is full) is
# worth retrying; this many attempts in all, with full-jitter backoff.
POST_ATTEMPTS = 4
POST_BACKOFF_SECONDS = 0.05
# The outcome of a post the deadline kept from starting (see INTEGRATION_TIMEOUT_SECONDS).
NOT_STARTED = "Deadline"
# A broadcast must answer before API Gateway gives up on the integration (29 s
# after the frame arrived) and before the function's own timeout, or the sender
# gets "Endpoint request timed out" and no counts. So it stops starting posts this
# many seconds before the earlier of the two and hands the rest of the room to an
# asynchronous invocation of this same function, which goes on from there (and
# hands on again, at most MAX_HANDOFFS times). What cannot be handed on counts as
# failed ("Deadline"): a room too big for one invocation is never cut off in silence.
INTEGRATION_TIMEOUT_SECONDS = 29.0
REPLY_RESERVE_SECONDS = 2.0
MAX_HANDOFFS = int(os.environ.get("MAX_HANDOFFS", "10"))
# The key of a hand-off event (API Gateway's events never have it).
HANDOFF = "handoff"
# Query pages of at most this many ids: posting starts once the first 100 ids are
# read, not after a whole 1 MB page (about 10,000 ids) is; later pages are bigger.
FIRST_PAGE_SIZE = 100
QUERY_PAGE_SIZE = 1000
# BatchWriteItem takes at most 25 requests; UnprocessedItems get this many tries.
BATCH_WRITE_LIMIT = 25
BATCH_WRITE_ATTEMPTS = 5

# A message's optional `ref`, the client's label echoed in its reply.
MAX_REF_LENGTH = 64

METRICS_NAMESPACE = "WebSocketBroadcast"

# The DynamoDB client methods this file calls and the IAM action each one needs:
# template.json grants exactly these (a test holds the two together).
DYNAMODB_ACTIONS = {
    "transact_write_items": "dynamodb:PutItem",
    "get_item": "dynamodb:GetItem",
    "query": "dynamodb:Query",
    "batch_write_item": "dynamodb:BatchWriteItem",
}

# --- Clients (created once per container) --------------------------------------------

# Short timeouts: a DynamoDB call that hangs must fail well inside API Gateway's
# 29-second integration timeout, with a clear error to the client.
dynamodb = boto3.client(
    "dynamodb",
    region_name=AWS_REGION,
    config=Config(
        connect_timeout=2,
        read_timeout=5,
        retries={"mode": "standard", "max_attempts": 3},
    ),
)

# The room-token secret, read from Secrets Manager on the first $connect that
# needs it and kept for the life of the container.
auth_secret_cache: list[bytes] = []
auth_secret_lock = threading.Lock()

# The Lambda API, to hand the rest of a big room to another invocation: made on
# the first hand-off, since most containers never need one.
lambda_api_cache: list[Any] = []

# Credentials for signing management API calls, from the standard chain (in
# Lambda, the function role's keys in the environment), resolved on first use.
credentials_cache: list[Any] = []


class ManagementApi(NamedTuple):
    """One stage's @connections endpoint and its idle keep-alive connections,
    shared by the fan-out threads of every invocation: a post takes one, or opens
    one, and puts it back, so there are never more than FANOUT_CONCURRENCY."""

    url: str  # https://{apiId}.execute-api.{region}.amazonaws.com/{stage}
    host: str  # the Host header, as signed
    path: str  # /{stage}
    address: tuple[str, int]  # where to connect: (hostname, port)
    tls: ssl.SSLContext | None  # None for plain http:// (the local stack)
    idle: deque[Connection]  # most recently used last


# One per endpoint, for the life of the container: never per invocation or per
# recipient, so TLS connections are reused across broadcasts.
management_apis: dict[str, ManagementApi] = {}
management_apis_lock = threading.Lock()

# The fan-out threads, also for the life of the container.
fanout_pool = ThreadPoolExecutor(max_workers=FANOUT_CONCURRENCY, thread_name_prefix="fanout")

# --- The dispatcher -------------------------------------------------------------------

Event = dict[str, Any]
Response = dict[str, Any]
Route = Callable[[Event, Any], Response]  # (event, Lambda context) -> response

ROUTES: dict[str, Route] = {}


def route(route_key: str) -> Callable[[Route], Route]:
    """Register the function below it as the handler of one route key."""

    def register(function: Route) -> Route:
        ROUTES[route_key] = function
        return function

    return register


def lambda_handler(event: Event, context: Any) -> Response:
    """Entry point: run the route's function; never let an exception escape.

    An exception would reach the client only as API Gateway's bare "Internal
    server error" frame; a 500 reply carrying the request id is something a
    client can show and an operator can find in the logs. Besides API Gateway's
    events, the function receives its own hand-offs (see `continue_broadcast`).
    """
    route_key = request_context(event).get("routeKey")
    handle = ROUTES.get(route_key, ROUTES["$default"])
    if HANDOFF in event and "requestContext" not in event:
        handle = continue_broadcast  # this function, invoked by itself (see `hand_off`)
    try:
        response = handle(event, context)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        log("ERROR", "dynamodb error", event, errorCode=code)
        if code in THROTTLING_CODES:
            response = error_reply(event, 503, "the service is busy, retry shortly", echo_of(event))
        else:
            response = error_reply(event, 500, "internal error", echo_of(event))
    except Exception:
        log("ERROR", "unhandled error", event, exception=traceback.format_exc())
        response = error_reply(event, 500, "internal error", echo_of(event))
    log("INFO", "handled", event, status=response.get("statusCode"))
    return response


# --- Routes ---------------------------------------------------------------------------


@route("$connect")
def connect(event: Event, context: Any) -> Response:
    """Join the room named in the query string (or the default room).

    Both items are written in one transaction: a connection is either fully in
    its room or not there at all. A bad room name refuses the handshake (the
    status becomes the HTTP status the client sees) and stores nothing.
    """
    room, problem = requested_room(event)
    if problem:
        return error_reply(event, 400, problem)
    if AUTH_MODE != "none":
        status, problem = check_room_token(event, room)
        if problem:
            return error_reply(event, status, problem)
    details = request_context(event)
    store_connection(
        connection_id(event),
        room,
        connected_at=int(details.get("connectedAt") or time.time() * 1000),
        source_ip=details.get("identity", {}).get("sourceIp", ""),
    )
    return {"statusCode": 200}


@route("$disconnect")
def disconnect(event: Event, context: Any) -> Response:
    """Leave the room. Idempotent: a connection with no items is already gone."""
    sender = connection_id(event)
    delete_connections([(room_of(sender), sender)])
    return {"statusCode": 200}


@route("message")
def message(event: Event, context: Any) -> Response:
    """Broadcast `messageBody` to every other connection in the sender's room.

    The frame is checked before anything is read or sent: a refused message
    reaches nobody. The room comes from the sender's own connection item, never
    from the frame, so a client cannot post into a room it did not join.
    """
    frame, problem = parse_frame(event.get("body"))
    if problem:
        return error_reply(event, 400, problem)
    echo, problem = ref_echo(frame)
    if problem:
        return error_reply(event, 400, problem)
    if frame.get("messageBody") is None:
        return error_reply(event, 400, "messageBody is required (any JSON value but null)", echo)
    body_json, problem = encode_message_body(frame["messageBody"])
    if problem:
        return error_reply(event, 400, problem, echo)
    size = len(body_json)
    if size > MAX_MESSAGE_BYTES:
        limit = f"messageBody is {size} bytes encoded; the limit is {MAX_MESSAGE_BYTES}"
        return error_reply(event, 413, limit, echo)

    sender = connection_id(event)
    room = room_of(sender)
    if room is None:
        return error_reply(event, 404, "this connection is not in a room; reconnect", echo)

    details = request_context(event)
    message_id = details.get("messageId") or details.get("requestId", "")
    payload = recipient_envelope(
        message_id, room, sender, details.get("requestTimeEpoch"), body_json
    )
    api = management_api(callback_url(event))
    started = time.perf_counter()
    counts = broadcast(room, sender, payload, api, posting_deadline(event, context))
    handoff = {
        "room": room,
        "sender": sender,
        "id": message_id,
        "stage": details.get("stage", ""),
        "callbackUrl": api.url,
        "payload": payload.decode(),
        "hop": 1,
    }
    counts, continued = hand_on_the_rest(counts, handoff, context)
    fanout_ms = round((time.perf_counter() - started) * 1000, 3)
    log_broadcast(event, room, handoff["stage"], counts, fanout_ms)
    # How the counts relate to the room: another invocation is posting to the rest
    # of it, or (when no hand-off could be made) part of it could not even be read.
    scope = {"continued": True} if continued else {}
    if not continued and counts.rest and counts.rest.unread:
        scope = {"complete": False}
    return reply(
        200,
        {
            "action": "sent",
            "id": message_id,
            "recipients": counts.recipients,
            "delivered": counts.delivered,
            "stale": counts.stale,
            "failed": counts.failed,
            **scope,
            **echo,
        },
    )


@route("ping")
def ping(event: Event, context: Any) -> Response:
    return reply(200, {"action": "pong", "time": int(time.time() * 1000)})


@route("$default")
def default(event: Event, context: Any) -> Response:
    """Any frame no other route took: say what was wrong and what would work."""
    frame, problem = parse_frame(event.get("body"))
    if not problem:
        action = frame.get("action")
        if action is None:
            problem = "the frame has no action"
        elif not isinstance(action, str):
            problem = "action must be a string"
        elif action in VALID_ACTIONS:
            # API Gateway could not read the action itself, though this parser can.
            problem = f"the frame could not be routed to {action!r}: is it nested too deeply?"
        else:
            problem = f"unknown action {action[:64]!r}"
    return error_reply(event, 400, problem)


# Actions a client may send (every route key that is not API Gateway's own).
VALID_ACTIONS = sorted(key for key in ROUTES if not key.startswith("$"))


def continue_broadcast(event: Event, context: Any) -> Response:
    """Post to the rest of a room that an earlier invocation of this function
    handed on at its deadline (see `hand_off`), and hand on again if need be.

    Invoked asynchronously: nobody waits for the answer. The counts go to the
    log and the metrics, under the message's id.
    """
    handoff = event[HANDOFF]
    api = management_api(handoff["callbackUrl"])
    started = time.perf_counter()
    stop_at = posting_deadline(event, context)
    room, sender, payload = handoff["room"], handoff["sender"], handoff["payload"].encode()
    counts = broadcast(room, sender, payload, api, stop_at, start_after=handoff["after"])
    counts, _ = hand_on_the_rest(counts, {**handoff, "hop": handoff["hop"] + 1}, context)
    fanout_ms = round((time.perf_counter() - started) * 1000, 3)
    log_broadcast(
        None, room, handoff["stage"], counts, fanout_ms, id=handoff["id"], hop=handoff["hop"]
    )
    return {"statusCode": 200}


# --- Event accessors ------------------------------------------------------------------


def request_context(event: Event) -> dict[str, Any]:
    context = event.get("requestContext") if isinstance(event, dict) else None
    return context if isinstance(context, dict) else {}


def connection_id(event: Event) -> str:
    return request_context(event).get("connectionId", "")


def request_id(event: Event) -> str:
    return request_context(event).get("requestId", "")


def posting_deadline(event: Event, context: Any) -> float:
    """When a broadcast stops starting posts, on the time.monotonic() clock: the
    reply's reserve before the function's own timeout or, for a frame from API
    Gateway, its integration timeout (counted from when the frame arrived),
    whichever comes first."""
    seconds_left = remaining_seconds(context)
    arrived_ms = request_context(event).get("requestTimeEpoch")
    if isinstance(arrived_ms, int | float):
        integration_left = arrived_ms / 1000 + INTEGRATION_TIMEOUT_SECONDS - time.time()
        seconds_left = min(seconds_left, integration_left)
    return time.monotonic() + seconds_left - REPLY_RESERVE_SECONDS


def remaining_seconds(context: Any) -> float:
    """The invocation's time left before the function's timeout (no context, as in
    some tests: the most a function may run, 15 minutes)."""
    if hasattr(context, "get_remaining_time_in_millis"):
        return context.get_remaining_time_in_millis() / 1000
    return 900.0


def query_parameter(event: Event, name: str) -> tuple[str | None, str | None]:
    """One query-string parameter of a $connect and, if it is ambiguous, why.

    `queryStringParameters` is absent (or null) without a query string. A
    repeated parameter is refused rather than guessed at.
    """
    values = (event.get("multiValueQueryStringParameters") or {}).get(name)
    if values and len(values) > 1:
        return None, f"give one {name} parameter, not several"
    return (event.get("queryStringParameters") or {}).get(name), None


def requested_room(event: Event) -> tuple[str, str | None]:
    """The room of a $connect (the default room if none is named) and, if it
    cannot be used, why."""
    room, problem = query_parameter(event, "room")
    if problem:
        return "", problem
    room = DEFAULT_ROOM if room is None else room
    if not isinstance(room, str) or not ROOM_NAME.fullmatch(room):
        return "", "room must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
    return room, None


# --- Frames ---------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_frame(body: Any) -> tuple[dict[str, Any], str | None]:
    """The frame as a dict and, if it is not a JSON object, why.

    NaN and Infinity are refused (Python would accept them; JavaScript clients
    could not parse them back), as are numbers too long to convert and nesting
    too deep to parse: every one of these is the client's error, not ours.
    """
    if not isinstance(body, str):
        return {}, "the frame must be a JSON object, as text"
    try:
        frame = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return {}, "the frame is not valid JSON"
    if not isinstance(frame, dict):
        return {}, "the frame must be a JSON object"
    return frame, None


def ref_echo(frame: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """The frame's `ref` as the fields to add to its reply, and why it is refused
    if it is. A ref is the client's own label for a message: replies to messages
    sent in a row may come back in any order, and the ref says which is which."""
    ref = frame.get("ref")
    if ref is None:
        return {}, None
    if not (isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH):
        return {}, f"ref must be a string of at most {MAX_REF_LENGTH} characters"
    return {"ref": ref}, None


def echo_of(event: Event) -> dict[str, str]:
    """The `ref` of the event's frame, if it has a valid one, for a reply written
    after a failure, so even a 500 can be matched to the message it answers."""
    frame, problem = parse_frame(event.get("body"))
    return {} if problem else ref_echo(frame)[0]


def encode_message_body(body: Any) -> tuple[bytes, str | None]:
    """`messageBody` as compact UTF-8 JSON: both the size that is checked and the
    bytes that are sent, so the body is encoded exactly once."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(), None
    except (ValueError, RecursionError):
        # A lone surrogate ("\ud800") parses but cannot be UTF-8 encoded.
        return b"", "messageBody is not valid Unicode JSON"


def recipient_envelope(
    message_id: str, room: str, sender: str, sent_at: Any, body_json: bytes
) -> bytes:
    """What every recipient gets, as bytes, built once per broadcast around the
    already-encoded body (re-encoding a 32 KB body per recipient is what makes
    naive fan-outs CPU-bound)."""
    head = json.dumps(
        {"action": "message", "id": message_id, "room": room, "from": sender, "sentAt": sent_at},
        separators=(",", ":"),
    )
    return head[:-1].encode() + b',"messageBody":' + body_json + b"}"


# --- Room tokens ----------------------------------------------------------------------
#
# With AUTH_MODE=token, joining a room takes a token your backend minted for
# that room: "<expiry>.<signature>", the signature an HMAC-SHA256, keyed by the
# shared secret, over "<room>:<expiry>" (a room name cannot contain ':'). Your
# backend decides who may join which room and hands out tokens; this function
# only checks them, and the secret never leaves Secrets Manager and this container.


def mint_room_token(secret: bytes, room: str, ttl_seconds: int, now: float | None = None) -> str:
    """A token that lets its holder join `room` for `ttl_seconds` (copy this function
    into your backend, or import it)."""
    expiry = int((time.time() if now is None else now) + ttl_seconds)
    return f"{expiry}.{room_token_signature(secret, room, expiry)}"


def room_token_signature(secret: bytes, room: str, expiry: int) -> str:
    digest = hmac.new(secret, f"{room}:{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


ROOM_TOKEN = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{43})")


def check_room_token(event: Event, room: str) -> tuple[int, str | None]:
    """(status, problem) for the $connect's token: 401 when it is missing or
    malformed, 403 when it is for another room, tampered with, or expired."""
    if AUTH_MODE != "token":
        # Fail closed: a mistyped mode must not open every room.
        log("ERROR", "AUTH_MODE must be none or token", event, authMode=AUTH_MODE)
        return 500, "authentication is misconfigured"
    token, problem = query_parameter(event, "token")
    if problem:
        return 401, problem
    if token is None:
        return 401, "this API needs a token: ?room=NAME&token=TOKEN"
    parts = ROOM_TOKEN.fullmatch(token)
    if parts is None:
        return 401, "the token is malformed"
    expiry = int(parts[1])
    expected = room_token_signature(auth_secret(), room, expiry)
    if not hmac.compare_digest(expected, parts[2]):
        return 403, "the token is not valid for this room"
    if expiry < time.time():
        return 403, "the token has expired"
    return 200, None


def auth_secret() -> bytes:
    """The signing secret, read from Secrets Manager once per container."""
    if not auth_secret_cache:
        with auth_secret_lock:
            if not auth_secret_cache:
                secrets = boto3.client(
                    "secretsmanager",
                    region_name=AWS_REGION,
                    config=Config(connect_timeout=2, read_timeout=5),
                )
                value = secrets.get_secret_value(SecretId=AUTH_SECRET_ARN)["SecretString"]
                auth_secret_cache.append(value.encode())
    return auth_secret_cache[0]


# --- Rooms in DynamoDB ------------------------------------------------------------------


def room_key(room: str, connection: str) -> dict[str, Any]:
    return {PARTITION_KEY: {"S": f"ROOM#{room}"}, SORT_KEY: {"S": connection}}


def connection_key(connection: str) -> dict[str, Any]:
    return {PARTITION_KEY: {"S": f"CONN#{connection}"}, SORT_KEY: {"S": connection}}


def store_connection(connection: str, room: str, connected_at: int, source_ip: str) -> None:
    """Write the membership and the connection item, all or nothing."""
    expires_at = {"N": str(connected_at // 1000 + CONNECTION_TTL_SECONDS)}
    connected = {"N": str(connected_at)}
    membership = {**room_key(room, connection), "connectedAt": connected, TTL_ATTRIBUTE: expires_at}
    details = {
        **connection_key(connection),
        "room": {"S": room},
        "connectedAt": connected,
        "sourceIp": {"S": source_ip},
        TTL_ATTRIBUTE: expires_at,
    }
    dynamodb.transact_write_items(
        TransactItems=[
            {"Put": {"TableName": TABLE_NAME, "Item": membership}},
            {"Put": {"TableName": TABLE_NAME, "Item": details}},
        ]
    )


def room_of(connection: str) -> str | None:
    """The room a connection joined, read consistently: a message sent right after
    $connect must find the item $connect has just written."""
    item = dynamodb.get_item(
        TableName=TABLE_NAME,
        Key=connection_key(connection),
        ConsistentRead=True,
        ProjectionExpression="room",
    ).get("Item")
    return item["room"]["S"] if item else None


def room_pages(
    room: str, start_after: str | None = None
) -> Iterator[tuple[list[tuple[str, int]], bool]]:
    """The (connection id, connectedAt in ms) of a room's members, one Query page
    at a time, each with whether more pages follow; from the member after
    `start_after`, if given.

    Every page is read (`LastEvaluatedKey`), so rooms past DynamoDB's 1 MB page
    are not silently cut short; the caller posts to one page while the next is read.
    The read is strongly consistent: whoever's handshake has completed gets every
    message sent after it, not only those sent once the table has caught up.
    """
    request: dict[str, Any] = {
        "TableName": TABLE_NAME,
        "KeyConditionExpression": "#pk = :room",
        "ExpressionAttributeNames": {"#pk": PARTITION_KEY, "#id": SORT_KEY},
        "ExpressionAttributeValues": {":room": {"S": f"ROOM#{room}"}},
        "ProjectionExpression": "#id, connectedAt",
        "ConsistentRead": True,
        "Limit": min(FIRST_PAGE_SIZE, QUERY_PAGE_SIZE),
    }
    if start_after is not None:
        request["ExclusiveStartKey"] = room_key(room, start_after)
    while True:
        page = dynamodb.query(**request)
        more = "LastEvaluatedKey" in page
        members = [
            (item[SORT_KEY]["S"], int(item.get("connectedAt", {}).get("N", 0)))
            for item in page.get("Items", [])
        ]
        yield members, more
        if not more:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        request["Limit"] = QUERY_PAGE_SIZE


def delete_connections(connections: list[tuple[str | None, str]]) -> None:
    """Delete both items of each (room, connection id), 25 requests per BatchWriteItem,
    retrying what DynamoDB leaves unprocessed. Deleting what is not there is fine."""
    keys = []
    for room, connection in connections:
        keys.append(connection_key(connection))
        if room is not None:
            keys.append(room_key(room, connection))
    for start in range(0, len(keys), BATCH_WRITE_LIMIT):
        chunk = keys[start : start + BATCH_WRITE_LIMIT]
        pending = {TABLE_NAME: [{"DeleteRequest": {"Key": key}} for key in chunk]}
        for attempt in range(BATCH_WRITE_ATTEMPTS):
            pending = dynamodb.batch_write_item(RequestItems=pending).get("UnprocessedItems")
            if not pending:
                break
            time.sleep(backoff_seconds(attempt))
        else:
            # The TTL removes what is left; the broadcast itself succeeded.
            log("WARNING", "items left for the TTL", None, unprocessed=len(pending[TABLE_NAME]))


# --- The broadcast --------------------------------------------------------------------


class Rest(NamedTuple):
    """The part of a room a broadcast did not post to before its deadline."""

    after: str | None  # the member id it starts after (None: the room's first member)
    known: int  # recipients read but not posted to
    unread: bool  # True: pages of the room were not even read


class Counts(NamedTuple):
    recipients: int  # posted to, or tried, in this invocation
    delivered: int
    stale: int
    failed: int
    failures: dict[str, int]
    rest: Rest | None = None  # what the deadline left, if anything


def broadcast(
    room: str,
    sender: str,
    payload: bytes,
    api: ManagementApi,
    stop_at: float = math.inf,
    start_after: str | None = None,
) -> Counts:
    """Post `payload` to every connection in `room` but the sender, in parallel
    (from the member after `start_after`, when another invocation did the first part).

    Pages are submitted to the fan-out pool as they arrive, so posting starts
    while the next page is read. Recipients answering 410 Gone are deleted in
    this same invocation, unless they may still be in their $connect. One failure
    never stops the others. No post starts after `stop_at` (time.monotonic()):
    the counts then say where the rest of the room starts.
    """
    outgoing = Outgoing(api, payload, hashlib.sha256(payload).hexdigest(), signing_keys(), stop_at)
    still_connecting_after = (time.time() - CONNECT_WINDOW_SECONDS) * 1000
    posts = []
    last_read = start_after  # where the rest starts, if pages are left unread
    unread = False
    for members, more in room_pages(room, start_after):
        last_read = members[-1][0] if members else last_read
        posts += [
            (recipient, connected_at, fanout_pool.submit(post, outgoing, recipient))
            for recipient, connected_at in members
            if recipient != sender
        ]
        if more and time.monotonic() >= stop_at:
            unread = True  # no post of the next page would start: leave it to the rest
            break
    outcomes = {"delivered": 0, "stale": 0}
    failures: dict[str, int] = {}
    stale_ids = []
    not_started = []  # indexes in `posts`, in key order
    for index, (recipient, connected_at, future) in enumerate(posts):
        try:
            outcome = future.result()
        except Exception as error:  # a bug in one post must not lose the others' counts
            outcome = type(error).__name__
        if outcome == NOT_STARTED:
            not_started.append(index)
        elif outcome in outcomes:
            outcomes[outcome] += 1
            if outcome == "stale" and connected_at < still_connecting_after:
                stale_ids.append(recipient)
        else:
            failures[outcome] = failures.get(outcome, 0) + 1
    if stale_ids:
        delete_connections([(room, stale) for stale in stale_ids])
    rest = None
    if not_started or unread:
        # The rest starts after the recipient just before the first post not started
        # (a later post that did start may then arrive twice: rare, and every copy
        # carries the message's id); the sender, if read again, is skipped again.
        after = last_read
        if not_started:
            first = not_started[0]
            after = posts[first - 1][0] if first else start_after
        rest = Rest(after, len(not_started), unread)
    return Counts(
        recipients=len(posts) - len(not_started),
        delivered=outcomes["delivered"],
        stale=outcomes["stale"],
        failed=sum(failures.values()),
        failures=failures,
        rest=rest,
    )


def hand_on_the_rest(counts: Counts, handoff: dict[str, Any], context: Any) -> tuple[Counts, bool]:
    """Hand what the deadline left of a room to a new invocation; when that cannot
    be done, count its recipients as failed. (The counts, whether it was handed on.)"""
    rest = counts.rest
    if rest is None:
        return counts, False
    if hand_off({**handoff, "after": rest.after}, context):
        return counts, True
    failures = {**counts.failures, NOT_STARTED: rest.known} if rest.known else counts.failures
    return counts._replace(
        recipients=counts.recipients + rest.known,
        failed=counts.failed + rest.known,
        failures=failures,
    ), False


def hand_off(handoff: dict[str, Any], context: Any) -> bool:
    """Invoke this function again, asynchronously, to post to the rest of a room
    (see `continue_broadcast`). False when it cannot: too many hand-offs already,
    no Lambda context to name the function by, or the invoke failed."""
    if handoff["hop"] > MAX_HANDOFFS or not hasattr(context, "invoked_function_arn"):
        return False
    try:
        lambda_api().invoke(
            FunctionName=context.invoked_function_arn,
            InvocationType="Event",
            Payload=json.dumps({HANDOFF: handoff}, ensure_ascii=False).encode(),
        )
    except (ClientError, BotoCoreError) as error:
        log("ERROR", "hand-off failed", None, id=handoff["id"], error=str(error))
        return False
    log("INFO", "handed off", None, id=handoff["id"], hop=handoff["hop"])
    return True


def lambda_api() -> Any:
    if not lambda_api_cache:
        functions = boto3.client(
            "lambda",
            region_name=AWS_REGION,
            config=Config(connect_timeout=2, read_timeout=5, retries={"mode": "standard"}),
        )
        lambda_api_cache.append(functions)
    return lambda_api_cache[0]


class Outgoing(NamedTuple):
    """One broadcast's payload, ready to post to any number of recipients: encoded
    and hashed once, with the keys that sign it."""

    api: ManagementApi
    payload: bytes
    payload_sha256: str
    keys: Any  # botocore ReadOnlyCredentials: access_key, secret_key, token
    stop_at: float = math.inf  # time.monotonic() past which no post starts


def post(outgoing: Outgoing, recipient: str) -> str:
    """Send the payload to one connection (PostToConnection) and classify the outcome:
    "delivered", "stale" (410 Gone: the connection no longer exists) or, for a
    failure, its error code.

    This is the one management API call on the hot path, made as a SigV4-signed
    HTTP/1.1 request written straight to a keep-alive connection (see
    `exchange`) rather than through the boto3 client, whose per-call machinery
    (parameter checks, event hooks, its own signer, response parsing) costs ten
    times the CPU, or urllib3's, which costs five: a fan-out to thousands of
    recipients is CPU-bound, and Lambda bills it.

    Retried: a 429 (nothing was delivered) and a connection that failed or was
    dropped before an answer, as boto3 would; a read timeout is not, since the
    message may have been delivered. Every message carries its id, so a client can
    drop the rare duplicate a dropped connection can cause.
    """
    api = outgoing.api
    path = f"{api.path}/@connections/{quote(recipient, safe='')}"
    status: int | str = "ConnectionError"
    for attempt in range(POST_ATTEMPTS):
        if attempt:
            time.sleep(backoff_seconds(attempt - 1))
        if time.monotonic() >= outgoing.stop_at:
            return NOT_STARTED  # the sender's reply must leave before the timeout
        message = request("POST", api, path, signed_headers(outgoing, path), outgoing.payload)
        try:
            status = exchange(api, message)
        except Unanswered:
            status = "ConnectionError"  # refused, reset, closed before answering: retry
            continue
        except TimeoutError:
            return "ReadTimeout"
        except ssl.SSLCertVerificationError:
            return "SSLError"
        if status == 200:
            return "delivered"
        if status == 410:
            return "stale"
        if status != 429:
            break
    return POST_ERROR_CODES.get(status, f"HTTP{status}") if isinstance(status, int) else status


def request(
    method: str, api: ManagementApi, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    """A whole HTTP/1.1 request, headers and body, as bytes for one write."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {api.host}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{head}\r\n".encode() + body


def signed_headers(outgoing: Outgoing, path: str) -> dict[str, str]:
    """SigV4 headers for POST `path`, as botocore's SigV4Auth computes them for
    service execute-api (a test holds the two together).

    Only the final HMAC is per request: the signing key is derived once a day and
    the payload hashed once per broadcast.
    """
    keys = outgoing.keys
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    day = amz_date[:8]
    signed_names = "host;x-amz-date"
    canonical_headers = f"host:{outgoing.api.host}\nx-amz-date:{amz_date}\n"
    headers = {"X-Amz-Date": amz_date}
    if keys.token:
        signed_names += ";x-amz-security-token"
        canonical_headers += f"x-amz-security-token:{keys.token}\n"
        headers["X-Amz-Security-Token"] = keys.token
    # Paths are encoded twice for SigV4 (everything but S3): '=' is %3D on the
    # wire and %253D in the canonical request.
    canonical_request = (
        f"POST\n{quote(path, safe='/~')}\n\n{canonical_headers}\n{signed_names}\n"
        f"{outgoing.payload_sha256}"
    )
    scope = f"{day}/{AWS_REGION}/execute-api/aws4_request"
    string_to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
        f"{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    )
    key = signing_key(keys.secret_key, day, AWS_REGION)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return headers


def signing_keys() -> Any:
    """The current access key, secret and session token (refreshed by botocore when
    they are temporary and about to expire)."""
    if not credentials_cache:
        credentials_cache.append(boto3.Session().get_credentials())
    return credentials_cache[0].get_frozen_credentials()


@functools.lru_cache(maxsize=8)
def signing_key(secret_key: str, day: str, region: str) -> bytes:
    """SigV4's derived key: valid for one day, region and service."""
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "execute-api", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


# The management API's error codes by status, as API Gateway names them.
POST_ERROR_CODES = {
    400: "BadRequestException",
    403: "ForbiddenException",
    413: "PayloadTooLargeException",
    429: "LimitExceededException",
}

THROTTLING_CODES = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
}


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff with full jitter: spreads retries of many threads apart."""
    return random.uniform(0, POST_BACKOFF_SECONDS * 2**attempt)  # noqa: S311 - jitter, not crypto


def callback_url(event: Event) -> str:
    """The @connections endpoint: CALLBACK_URL if set, else the stage's execute-api URL.

    Built from `apiId`, not `domainName`: behind a custom domain, `domainName` is
    that domain, which does not serve @connections.
    """
    if CALLBACK_URL:
        return CALLBACK_URL.rstrip("/")
    context = request_context(event)
    suffix = "amazonaws.com.cn" if AWS_REGION.startswith("cn-") else "amazonaws.com"
    return f"https://{context['apiId']}.execute-api.{AWS_REGION}.{suffix}/{context['stage']}"


def management_api(url: str) -> ManagementApi:
    """The endpoint's shared connection pool, created on first use in this container."""
    api = management_apis.get(url)
    if api is None:
        with management_apis_lock:
            api = management_apis.get(url)
            if api is None:
                api = management_apis[url] = open_management_api(url)
    return api


def open_management_api(url: str) -> ManagementApi:
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    hostname, port = parts.hostname or "", parts.port or default_port
    host = hostname if port == default_port else f"{hostname}:{port}"
    tls = None
    if parts.scheme == "https":
        # Verified against the CA bundle botocore uses for every other AWS call.
        tls = ssl.create_default_context(cafile=get_cert_path(True))
    return ManagementApi(url, host, parts.path.rstrip("/"), (hostname, port), tls, deque())


# --- The management API's connections -------------------------------------------------
#
# A post is one small request and one small answer on a keep-alive HTTP/1.1
# connection: written in one piece, read line by line. That is all `exchange`
# does, in a few dozen lines of standard library; a general HTTP client spends
# most of a post's CPU on what it does not need here (URL parsing, header
# objects, retry policies, response objects).

# A post takes tens of milliseconds; these fail a dead endpoint well inside the
# integration timeout.
CONNECT_TIMEOUT_SECONDS = 1.0
READ_TIMEOUT_SECONDS = 5.0
MAX_LINE_BYTES = 65536


class Connection(NamedTuple):
    sock: socket.socket
    reader: IO[bytes]  # buffered reads from sock


class Unanswered(Exception):
    """The request got no answer: the connection could not be made, or failed or
    closed before the answer began. Nothing was delivered, so it can be sent again."""


def exchange(api: ManagementApi, request: bytes) -> int:
    """Send `request` over an idle connection to `api` (or a new one) and return the
    answer's status; the body is read and dropped. The connection is kept for the
    next post unless either side asked to close it. Raises Unanswered, or
    TimeoutError when the answer is late (the request may have been delivered)."""
    try:
        connection = take_connection(api)
    except ssl.SSLCertVerificationError:
        raise  # not the endpoint it claims to be: no point in trying again
    except OSError as error:
        raise Unanswered(str(error)) from error
    try:
        connection.sock.sendall(request)
        status, keep_alive = read_answer(connection.reader)
    except TimeoutError:
        close(connection)
        raise
    except (OSError, ValueError) as error:  # ValueError: not an HTTP answer
        close(connection)
        raise Unanswered(str(error)) from error
    if keep_alive:
        api.idle.append(connection)
    else:
        close(connection)
    return status


def close(connection: Connection) -> None:
    """Close the socket now: its file descriptor is shared with the reader."""
    connection.reader.close()
    connection.sock.close()


def take_connection(api: ManagementApi) -> Connection:
    """The most recently used idle connection that is still open, or a new one."""
    while api.idle:
        try:
            connection = api.idle.pop()
        except IndexError:  # another thread took the last one
            break
        if not has_data(connection.sock):
            return connection
        close(connection)  # an idle connection has nothing to read unless it closed
    sock = socket.create_connection(api.address, timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        # As boto3's clients do: without it, the body waits for the headers' delayed
        # ACK, adding ~40 ms to every post.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if api.tls is not None:
            sock = api.tls.wrap_socket(sock, server_hostname=api.address[0])
        sock.settimeout(READ_TIMEOUT_SECONDS)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, sock.makefile("rb"))


def has_data(sock: socket.socket) -> bool:
    """Whether reading `sock` would not wait (data, or the other end closed it)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])  # Windows: no poll


def read_answer(reader: IO[bytes]) -> tuple[int, bool]:
    """Read one HTTP/1.1 answer: (its status, whether the connection stays open)."""
    status_line = read_line(reader)
    version, status = status_line.split(None, 2)[:2]
    status_code = int(status)
    keep_alive = version == b"HTTP/1.1"
    length, chunked = None, False
    while (line := read_line(reader)) not in (b"\r\n", b"\n"):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value != b"identity"
        elif name == b"connection":
            keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    if status_code < 200 or status_code in (204, 304):
        return status_code, keep_alive  # no body
    if chunked:
        while size := int(read_line(reader).split(b";")[0], 16):
            read_exactly(reader, size + 2)  # the chunk and its CRLF
        while read_line(reader) not in (b"\r\n", b"\n"):
            pass  # trailers
    elif length is not None:
        read_exactly(reader, length)
    else:
        keep_alive = False  # the body runs to the end of the connection
    return status_code, keep_alive


def read_line(reader: IO[bytes]) -> bytes:
    line = reader.readline(MAX_LINE_BYTES)
    if not line.endswith(b"\n"):
        raise ConnectionResetError("the connection closed in the middle of the answer")
    return line


def read_exactly(reader: IO[bytes], size: int) -> None:
    if len(reader.read(size)) < size:
        raise ConnectionResetError("the connection closed in the middle of the answer")


# --- Replies and logs -----------------------------------------------------------------


def reply(status: int, body: dict[str, Any]) -> Response:
    """A route's response; on two-way routes API Gateway sends `body` to the caller."""
    return {"statusCode": status, "body": json.dumps(body, separators=(",", ":"))}


def error_reply(
    event: Event, status: int, problem: str, echo: dict[str, Any] | None = None
) -> Response:
    body = {"action": "error", "status": status, "error": problem, "validActions": VALID_ACTIONS}
    if status >= 500:
        body["requestId"] = request_id(event)
    return reply(status, {**body, **(echo or {})})


LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


def log(level: str, message: str, event: Event | None, **fields: Any) -> None:
    """One JSON object per line on stdout, which Lambda sends to CloudWatch Logs.
    Never a message body: what people write to each other stays out of the logs."""
    if LOG_LEVELS[level] < LOG_LEVELS.get(LOG_LEVEL, 20):
        return
    entry = {"level": level, "message": message}
    if event is not None:
        context = request_context(event)
        entry.update(
            route=context.get("routeKey"),
            connectionId=context.get("connectionId"),
            requestId=context.get("requestId"),
        )
    entry.update(fields)
    # One write per line, so lines from several threads never interleave.
    sys.stdout.write(json.dumps(entry, default=str) + "\n")


def log_broadcast(
    event: Event | None, room: str, stage: str, counts: Counts, fanout_ms: float, **fields: Any
) -> None:
    """The broadcast's log line, which is also its CloudWatch Embedded Metric Format
    record: CloudWatch turns the named fields into metrics, no extra call needed.
    A hand-off logs its own line (event None), with the message's id and its hop."""
    metrics = [
        {"Name": "Recipients", "Unit": "Count"},
        {"Name": "Delivered", "Unit": "Count"},
        {"Name": "Stale", "Unit": "Count"},
        {"Name": "Failed", "Unit": "Count"},
        {"Name": "FanoutMs", "Unit": "Milliseconds"},
    ]
    log(
        "INFO",
        "broadcast",
        event,
        room=room,
        Stage=stage,
        Recipients=counts.recipients,
        Delivered=counts.delivered,
        Stale=counts.stale,
        Failed=counts.failed,
        FanoutMs=fanout_ms,
        failures=counts.failures,
        **({"rest": counts.rest._asdict()} if counts.rest else {}),
        **fields,
        _aws={
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {"Namespace": METRICS_NAMESPACE, "Dimensions": [["Stage"]], "Metrics": metrics}
            ],
        },
    )
