"""An API Gateway WebSocket API on one aiohttp port, hosting a Lambda handler.

It behaves as API Gateway does (the README's "Run locally" lists how), in
the order a connection lives:

1. Upgrade on `/{stage}`: a plain GET gets 426, another path 403. The
   handshake is HELD while `$connect` runs; a non-2xx status rejects it with
   that status, a handler error with 502; `Sec-WebSocket-Protocol` is echoed
   only when the handler returns it. Posts to a connection still in
   `$connect` get 410.
2. Frames: text frames are routed by the template's route selection
   expression and invoke the handler; two-way routes send the handler's
   `body` back. Binary frames close with 1003, a frame over 32 KB or a message
   over 128 KB with 1009. Errors reach the client as API Gateway's error
   frames (`Forbidden`, `Internal server error`, `Endpoint request timed out`).
3. Timeouts: idle (no data either way, posts included) and maximum duration
   close with 1001 "Going away".
4. `$disconnect` runs after the socket is gone, for every connection that
   ends, with API Gateway's close code and reason.
5. The management API (`/{stage}/@connections/{id}`, and `/@connections/{id}`):
   SigV4-checked POST / GET / DELETE with API Gateway's status codes, bodies
   and `x-amzn-ErrorType` headers, so boto3 raises its modeled exceptions.
   What the gateway sends (posts and replies) goes out in frames of at most
   32 KB, as API Gateway splits it.
6. Local controls under `/@local/` (not part of API Gateway) for tests, and
   the browser page from `local/static/` on `/`.
7. Lambda's Invoke API for the hosted function
   (`/2015-03-31/functions/{name}/invocations`, SigV4-checked), so a handler can
   invoke itself asynchronously, as the broadcast does to hand on a big room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from local import events, sigv4
from local.runtime import LambdaRuntime, Outcome
from local.selection import RouteSelector
from local.template import Api

log = logging.getLogger("local.gateway")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# A connection id as API Gateway makes them: URL-safe base64 of 12 bytes.
CONNECTION_ID = re.compile(r"[A-Za-z0-9_-]{15}=")
# A recipient that stopped reading: past this much unsent data, posts get 429
# (API Gateway's LimitExceededException), instead of buffering without bound.
CLIENT_BUFFER_LIMIT = 4 * 1024 * 1024

GOING_AWAY = (1001, "Going away")
DELETED = (1000, "Connection Closed Normally")
DROPPED = (1006, "Connection closed abnormally")
BINARY_REFUSED = (1003, "Binary frames are not supported")
# On shutdown, how long clients get to answer the close frame before being cut off.
SHUTDOWN_HANDSHAKE = 1.0


@dataclass
class GatewaySettings:
    """Everything `python -m local` can configure about the emulated API."""

    stage: str = events.DEFAULT_STAGE
    api_id: str = events.DEFAULT_API_ID
    region: str = "us-east-1"
    idle_timeout: float = 600.0
    max_duration: float = 7200.0
    integration_timeout: float = 29.0
    max_frame_bytes: int = 32 * 1024
    max_message_bytes: int = 128 * 1024
    post_latency_ms: float = 0.0
    # Between $connect's 2xx and the open connection, API Gateway's own hand-off:
    # posts to the connection meanwhile get 410, though $connect stored it.
    connect_latency_ms: float = 0.0
    fault_gone_rate: float = 0.0
    fault_throttle_rate: float = 0.0
    fault_seed: int | None = None
    verify_sigv4: bool = True
    # access key id -> secret key: who may call the management API.
    credentials: dict[str, str] = field(default_factory=dict)
    static_dir: Path = STATIC_DIR
    # How long a closing handshake may wait for the client's close frame.
    close_timeout: float = 5.0


# --- Connections ---------------------------------------------------------------------


@dataclass(eq=False)
class Client:
    """One connection from the upgrade request to its `$disconnect`."""

    connection: events.Connection
    query: list[tuple[str, str]]  # the query string's pairs, in order
    ws: _ApiGatewayWebSocket | None = None  # None while $connect runs
    transport: asyncio.Transport | None = None
    last_activity: float = 0.0  # loop time, for the idle timeout
    last_active_at: int = 0  # epoch ms, for GetConnection
    close_code: int | None = None  # set once the connection is ending
    close_reason: str = ""
    report_disconnect: bool = True
    # The task serving the connection; the gateway interrupts its read to close.
    task: asyncio.Task[Any] | None = None
    close_requested: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def connection_id(self) -> str:
        return self.connection.connection_id

    def touch(self, now: float) -> None:
        self.last_activity = now
        self.last_active_at = events.now_ms()

    def ending(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason


class _FrameSizeGuard:
    """aiohttp limits the size of a message but not of a frame; API Gateway limits
    both. This sits in front of aiohttp's frame parser and reads only the frame
    headers going past; a data frame over the limit fails the connection with 1009,
    as a message over the limit does in aiohttp itself."""

    def __init__(self, parser: Any, queue: Any, max_frame_bytes: int) -> None:
        self._parser = parser
        self._queue = queue
        self._max = max_frame_bytes
        self._header = b""  # an incomplete frame header carried to the next read
        self._payload_left = 0  # bytes of the current frame's payload still to come
        self._failed = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return False, b""
        offending = self._scan(data)
        if offending is None:
            return self._parser.feed_data(data)
        start, size = offending
        self._failed = True
        if start > 0:
            self._parser.feed_data(data[:start])
        self._queue.set_exception(
            WebSocketError(
                WSCloseCode.MESSAGE_TOO_BIG,
                f"Frame of {size} bytes exceeds the {self._max}-byte frame limit",
            )
        )
        return False, b""

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def _scan(self, data: bytes) -> tuple[int, int] | None:
        """Follow the frame boundaries through `data`: (the offset in `data` where a data
        frame over the limit starts, its size), or None when there is none."""
        skip = min(self._payload_left, len(data))  # the rest of the last frame's payload
        self._payload_left -= skip
        if self._payload_left:
            return None  # all of `data` was payload
        carried, self._header = self._header, b""  # a header split across two reads
        buffer = carried + data[skip:] if carried or skip else data
        buffer_start = skip - len(carried)  # where buffer[0] is in `data`
        position = 0
        while position < len(buffer):
            header = _frame_header(buffer, position)
            if header is None:
                self._header = buffer[position:]
                return None
            opcode, size, header_size = header
            if opcode in _DATA_OPCODES and size > self._max:
                return max(0, buffer_start + position), size
            position += header_size + size
        self._payload_left = position - len(buffer)
        return None


_DATA_OPCODES = frozenset({0x0, 0x1, 0x2})  # continuation, text, binary


def _frame_header(buffer: bytes, position: int) -> tuple[int, int, int] | None:
    """(opcode, payload size, header size) of the frame at `position` (RFC 6455 5.2),
    or None when its header is not all there yet."""
    if len(buffer) - position < 2:
        return None
    first, second = buffer[position], buffer[position + 1]
    size = second & 0x7F
    extended = {126: 2, 127: 8}.get(size, 0)
    header_size = 2 + extended + (4 if second & 0x80 else 0)
    if len(buffer) - position < header_size:
        return None
    if extended:
        size = int.from_bytes(buffer[position + 2 : position + 2 + extended], "big")
    return first & 0x0F, size, header_size


def _fragments(data: bytes, opcode: int, limit: int) -> bytes:
    """`data` as one message in frames of at most `limit` bytes (RFC 6455 5.4): the
    first frame carries the opcode, the others are continuations, and only the last
    has FIN set. A server's frames are not masked."""
    chunks = [data[start : start + limit] for start in range(0, len(data), limit)]
    frames = bytearray()
    for index, chunk in enumerate(chunks):
        first = (0x80 if index == len(chunks) - 1 else 0) | (opcode if index == 0 else 0)
        if len(chunk) < 126:
            frames += bytes([first, len(chunk)])
        elif len(chunk) < 65536:
            frames += bytes([first, 126]) + len(chunk).to_bytes(2, "big")
        else:
            frames += bytes([first, 127]) + len(chunk).to_bytes(8, "big")
        frames += chunk
    return bytes(frames)


class _ApiGatewayWebSocket(web.WebSocketResponse):
    """aiohttp's WebSocket with API Gateway's frame size limit both ways: in front of
    its parser for what clients send, and splitting what the gateway sends."""

    def __init__(self, *, max_frame_bytes: int, **options: Any) -> None:
        super().__init__(**options)
        self._max_frame_bytes = max_frame_bytes

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        super()._post_start(request, protocol, writer)
        # The parser was installed just now, with nothing read yet since the 101 left
        # (no await in between): wrap it before any frame arrives.
        handler = request.protocol
        handler._payload_parser = _FrameSizeGuard(  # type: ignore[union-attr]
            handler._payload_parser,  # type: ignore[union-attr]
            self._reader,
            self._max_frame_bytes,
        )

    async def send_message(self, data: bytes, opcode: WSMsgType = WSMsgType.TEXT) -> None:
        """Send `data` as one message, split as API Gateway splits what it sends
        (posts and replies alike) into frames of at most the frame limit."""
        if len(data) <= self._max_frame_bytes:
            await self.send_frame(data, opcode)
            return
        writer = self._writer
        if self.closed or writer is None or writer.transport.is_closing():
            raise ConnectionResetError("the connection is closing")
        # aiohttp only writes whole messages in one frame. One write of every frame:
        # nothing else sent on this connection can come between them.
        writer.transport.write(_fragments(data, opcode, self._max_frame_bytes))


def _opcode_for(data: bytes) -> WSMsgType:
    """Posted data goes out as text; data that is not UTF-8 goes out unchanged, as
    binary, rather than corrupted."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return WSMsgType.BINARY
    return WSMsgType.TEXT


def _error_frame(text: str, connection_id: str, request_id: str) -> str:
    """API Gateway's error frame, byte for byte: a space only after the first colon."""
    return (
        f'{{"message": {json.dumps(text)}, "connectionId":{json.dumps(connection_id)}, '
        f'"requestId":{json.dumps(request_id)}}}'
    )


def _iso_ms(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def _header(headers: Any, name: str) -> str | None:
    """A header of a Lambda proxy response, whatever its casing."""
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name.lower():
            return str(value)
    return None


# --- The gateway ---------------------------------------------------------------------


class Gateway:
    """The API's state (live connections) and its aiohttp handlers."""

    def __init__(self, settings: GatewaySettings, api: Api, runtime: LambdaRuntime) -> None:
        self.settings = settings
        self.routes = api.routes
        self.two_way_routes = api.two_way_routes
        self.selector = RouteSelector.build(api.route_selection_expression, api.routes)
        self.runtime = runtime
        self.clients: dict[str, Client] = {}
        self.stopping = False
        self._random = random.Random(settings.fault_seed)  # noqa: S311 - fault injection, not security
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connection_tasks: dict[asyncio.Task[Any], Client] = {}
        # What the management API's posts came to, for load tests: see `stats`.
        self.post_outcomes: collections.Counter[str] = collections.Counter()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        stage_connections = "/{stage}/@connections/{connection_id}"
        app.router.add_get("/", self.index)
        if self.settings.static_dir.is_dir():
            app.router.add_static("/static/", self.settings.static_dir)
        app.router.add_get("/@local/connections", self.list_connections)
        app.router.add_get("/@local/stats", self.stats)
        app.router.add_post(
            "/@local/connections/{connection_id}/lose-disconnect", self.lose_disconnect
        )
        app.router.add_route("*", "/@connections/{connection_id}", self.management)
        app.router.add_route("*", stage_connections, self.management)
        app.router.add_post("/2015-03-31/functions/{function}/invocations", self.invoke_function)
        app.router.add_get("/{stage}", self.upgrade)
        app.router.add_route("*", "/{tail:.*}", self.forbidden)
        return app

    def _background(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- 1. Upgrade and $connect -----------------------------------------------------

    async def upgrade(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["stage"] != self.settings.stage:
            return await self.forbidden(request)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(
                status=426, text="Upgrade Required", headers={"Upgrade": "websocket"}
            )
        ws = _ApiGatewayWebSocket(
            max_frame_bytes=self.settings.max_frame_bytes,
            # aiohttp refuses a message of max_msg_size bytes; API Gateway allows it.
            max_msg_size=self.settings.max_message_bytes + 1,
            compress=False,
            timeout=self.settings.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="Bad WebSocket handshake")
        if self.stopping:
            return web.Response(status=503, text="The local stack is shutting down")

        client = Client(
            connection=events.Connection(
                source_ip=request.remote or "",
                user_agent=request.headers.get("User-Agent"),
                domain_name=request.host,
                stage=self.settings.stage,
                api_id=self.settings.api_id,
            ),
            query=list(request.query.items()),
        )
        task = client.task = asyncio.current_task()
        if task is not None:
            self._connection_tasks[task] = client
        self.clients[client.connection_id] = client
        try:
            return await self._serve(client, ws, request)
        finally:
            self.clients.pop(client.connection_id, None)
            if task is not None:
                self._connection_tasks.pop(task, None)

    async def _serve(
        self, client: Client, ws: _ApiGatewayWebSocket, request: web.Request
    ) -> web.StreamResponse:
        status, protocol = await self._connect(client, request)
        if not 200 <= status < 300:
            return web.Response(status=status)
        if protocol is not None:
            ws.headers["Sec-WebSocket-Protocol"] = protocol
        if self.settings.connect_latency_ms > 0:
            await asyncio.sleep(self.settings.connect_latency_ms / 1000)
        try:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError
            await ws.prepare(request)
        except ConnectionError:
            # The client left while $connect ran, which may have stored the connection:
            # its $disconnect lets the handler forget it.
            log.info("%s left during $connect", client.connection_id)
            client.ending(*DROPPED)
            await self._disconnect(client)
            return web.Response(status=400)
        loop = asyncio.get_running_loop()
        client.ws, client.transport = ws, request.transport
        # Let sends buffer up to past the limit instead of waiting for the client: a
        # post to a client that does not read gets 429 at once, never hangs.
        request.transport.set_write_buffer_limits(high=2 * CLIENT_BUFFER_LIMIT)
        client.touch(loop.time())
        client.timers = [
            loop.call_later(self.settings.idle_timeout, self._check_idle, client),
            loop.call_later(self.settings.max_duration, self._close, client, *GOING_AWAY),
        ]
        if self.stopping:
            self._close(client, *GOING_AWAY)
        try:
            await self._receive(client, ws)
        finally:
            for timer in client.timers:
                timer.cancel()
            self.clients.pop(client.connection_id, None)
        if client.report_disconnect:
            await self._disconnect(client)
        return ws

    async def _connect(self, client: Client, request: web.Request) -> tuple[int, str | None]:
        """Run $connect: (the HTTP status to answer, the subprotocol to echo)."""
        if "$connect" not in self.routes:
            return 200, None
        headers = [
            (name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
            for name, value in request.raw_headers
        ]
        event = events.connect(client.connection, query=client.query, headers=headers)
        outcome = await self.runtime.invoke(event, wait_seconds=self.settings.integration_timeout)
        if outcome.timed_out:
            return 504, None
        if not outcome.ok:
            return 502, None
        result = outcome.result
        status = result.get("statusCode") if isinstance(result, dict) else None
        if isinstance(status, str) and status.isdigit():
            status = int(status)
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            log.warning(
                "$connect returned %r: a Lambda proxy response needs a statusCode (200-599); "
                "answering 502",
                result,
            )
            return 502, None
        return status, _header(result.get("headers"), "Sec-WebSocket-Protocol")

    # --- 2. Frames -------------------------------------------------------------------

    async def _receive(self, client: Client, ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await ws.receive()
            except asyncio.CancelledError:
                if not client.close_requested:
                    raise
                # _close() interrupted the read: do the closing handshake here, in the
                # one task that reads this socket, so the client's close frame is awaited.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                await ws.close(code=client.close_code or 1000, message=client.close_reason.encode())
                return
            if message.type is WSMsgType.TEXT:
                client.touch(loop.time())
                self._background(self._route(client, message.data))
            elif message.type is WSMsgType.BINARY:
                self._close(client, *BINARY_REFUSED)
            elif message.type is WSMsgType.CLOSE:
                # The client's close frame (aiohttp has answered it); 0 means it had no code.
                self.clients.pop(client.connection_id, None)
                if message.data:
                    client.ending(message.data, message.extra or "")
                else:
                    client.ending(1005, events.NO_STATUS_REASON)
                return
            elif message.type is WSMsgType.ERROR:
                # A protocol error: aiohttp has closed the connection with its code.
                client.ending(ws.close_code or 1002, str(message.data))
                return
            else:  # CLOSING / CLOSED: our own close, or the TCP connection dropped
                client.ending(*DROPPED)
                return

    async def _route(self, client: Client, body: str) -> None:
        """Route one frame; whatever goes wrong, the client hears about it, as from
        API Gateway, rather than waiting for a reply that never comes."""
        try:
            await self._route_frame(client, body)
        except Exception:
            log.exception("routing a frame of %s failed", client.connection_id)
            error = _error_frame("Internal server error", client.connection_id, events.new_id())
            with contextlib.suppress(Exception):
                await self._send(client, error)

    async def _route_frame(self, client: Client, body: str) -> None:
        route = self.selector.select(body)
        if route is None:
            await self._send(
                client, _error_frame("Forbidden", client.connection_id, events.new_id())
            )
            return
        event = events.message(client.connection, body, route)
        request_id = event["requestContext"]["requestId"]
        outcome = await self.runtime.invoke(event, wait_seconds=self.settings.integration_timeout)
        if outcome.timed_out:
            await self._send(
                client, _error_frame("Endpoint request timed out", client.connection_id, request_id)
            )
            return
        reply = self._route_response(route, outcome, client.connection_id, request_id)
        if reply is not None:
            await self._send(client, reply)

    def _route_response(
        self, route: str, outcome: Outcome, connection_id: str, request_id: str
    ) -> str | None:
        """The frame a finished invocation sends back, if any."""
        if not outcome.ok:
            return _error_frame("Internal server error", connection_id, request_id)
        if route not in self.two_way_routes:
            return None
        result = outcome.result
        body = result.get("body") if isinstance(result, dict) else None
        if not isinstance(result, dict) or not isinstance(body, str | None):
            log.warning(
                "route %s returned %r: a Lambda proxy response is an object whose body is a "
                "string; sending 'Internal server error'",
                route,
                result,
            )
            return _error_frame("Internal server error", connection_id, request_id)
        return body or ""

    async def _send(self, client: Client, text: str) -> None:
        ws = client.ws
        if ws is None or ws.closed:
            return
        # The connection may have ended meanwhile; its $disconnect is on its way.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_message(text.encode())

    # --- 3. Timeouts and server-side closes ------------------------------------------

    def _check_idle(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        remaining = self.settings.idle_timeout - (loop.time() - client.last_activity)
        if remaining <= 0:
            self._close(client, *GOING_AWAY)
        else:
            client.timers.append(loop.call_later(remaining, self._check_idle, client))

    def _close(self, client: Client, code: int, reason: str) -> None:
        """Close a connection from the gateway's side; its $disconnect follows."""
        if client.close_code is not None or client.ws is None or client.task is None:
            return
        client.ending(code, reason)
        client.close_requested = True
        self.clients.pop(client.connection_id, None)
        client.task.cancel()

    def _drop(self, client: Client) -> None:
        """Cut the TCP connection, without a close frame."""
        if client.close_code is not None or client.transport is None:
            return
        client.ending(*DROPPED)
        self.clients.pop(client.connection_id, None)
        client.transport.abort()

    # --- 4. $disconnect --------------------------------------------------------------

    async def _disconnect(self, client: Client) -> None:
        if "$disconnect" not in self.routes:
            return
        code, reason = client.close_code or DROPPED[0], client.close_reason
        event = events.disconnect(client.connection, code, reason)
        outcome = await self.runtime.invoke(event, wait_seconds=self.settings.integration_timeout)
        if not outcome.ok:
            log.warning(
                "$disconnect of %s failed: %s", client.connection_id, outcome.error or "timed out"
            )

    # --- 5. The management API -------------------------------------------------------

    async def management(self, request: web.Request) -> web.Response:
        stage = request.match_info.get("stage")
        if stage is not None and stage != self.settings.stage:
            return _management_error(403, "ForbiddenException", "Forbidden")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _management_error(413, "PayloadTooLargeException", "Request Entity Too Large")
        problem = self._signature_problem(request, body, sigv4.SERVICE)
        if problem is not None:
            return _management_error(403, "ForbiddenException", problem)
        if self.settings.post_latency_ms > 0:
            await asyncio.sleep(self.settings.post_latency_ms / 1000)
        connection_id = request.match_info["connection_id"]
        if not CONNECTION_ID.fullmatch(connection_id):
            return _management_error(
                400, "BadRequestException", f"Invalid connectionId: {connection_id}"
            )
        action = {"POST": self._post, "GET": self._get, "DELETE": self._delete}.get(request.method)
        if action is None:
            return _management_error(403, "ForbiddenException", "Forbidden")
        return await action(connection_id, body)

    def _signature_problem(self, request: web.Request, body: bytes, service: str) -> str | None:
        """Why the request's SigV4 signature is refused, or None (also when
        --no-verify-sigv4 turned the check off)."""
        if not self.settings.verify_sigv4:
            return None
        problem = sigv4.verify(
            method=request.method,
            host=request.host,
            raw_path=request.raw_path,
            headers=request.headers,
            body=body,
            secrets=self.settings.credentials,
            region=self.settings.region,
            service=service,
        )
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.raw_path, problem)
        return problem

    def _live(self, connection_id: str) -> Client | None:
        """The connection if posts can reach it: established and not ending."""
        client = self.clients.get(connection_id)
        if client is None or client.ws is None or client.close_code is not None:
            return None
        return client

    async def _post(self, connection_id: str, data: bytes) -> web.Response:
        if len(data) > self.settings.max_message_bytes:
            return _management_error(
                413,
                "PayloadTooLargeException",
                f"Data of {len(data)} bytes is over the limit of {self.settings.max_message_bytes}",
            )
        client = self._live(connection_id)
        if client is None or client.ws is None:
            self.post_outcomes["gone"] += 1
            return _management_error(410, "GoneException")
        if self.settings.fault_gone_rate and self._random.random() < self.settings.fault_gone_rate:
            # As if the connection had died and its $disconnect had been lost: the
            # caller's 410 handling is all that can clean it up.
            self.post_outcomes["injectedGone"] += 1
            client.report_disconnect = False
            self._drop(client)
            return _management_error(410, "GoneException")
        if (
            self.settings.fault_throttle_rate
            and self._random.random() < self.settings.fault_throttle_rate
        ):
            self.post_outcomes["injectedThrottle"] += 1
            return _management_error(429, "LimitExceededException", "Rate exceeded")
        if (
            client.transport is not None
            and client.transport.get_write_buffer_size() > CLIENT_BUFFER_LIMIT
        ):
            self.post_outcomes["bufferFull"] += 1
            return _management_error(
                429, "LimitExceededException", "The client is not reading: its buffer is full"
            )
        client.touch(asyncio.get_running_loop().time())
        try:
            await client.ws.send_message(data, _opcode_for(data))
        except (ConnectionError, RuntimeError):
            self.post_outcomes["gone"] += 1
            return _management_error(410, "GoneException")
        self.post_outcomes["delivered"] += 1
        return _management_response(200)

    async def _get(self, connection_id: str, _: bytes) -> web.Response:
        client = self._live(connection_id)
        if client is None:
            return _management_error(410, "GoneException")
        connection = client.connection
        document = {
            "connectedAt": _iso_ms(connection.connected_at),
            "identity": connection.identity(),
            "lastActiveAt": _iso_ms(client.last_active_at),
        }
        return _management_response(200, json.dumps(document))

    async def _delete(self, connection_id: str, _: bytes) -> web.Response:
        client = self._live(connection_id)
        if client is None:
            return _management_error(410, "GoneException")
        self._close(client, *DELETED)
        return _management_response(204)

    # --- 6. Local controls, the page, everything else --------------------------------

    async def list_connections(self, _: web.Request) -> web.Response:
        """The live connections (for tests and curious humans)."""
        document = [
            {
                "connectionId": client.connection_id,
                "connectedAt": client.connection.connected_at,
                "identity": client.connection.identity(),
                "query": {key: [v for k, v in client.query if k == key] for key, _ in client.query},
                "established": client.ws is not None,
            }
            for client in self.clients.values()
        ]
        return web.json_response(document)

    async def stats(self, _: web.Request) -> web.Response:
        """How the posts went: delivered, gone (410), injected faults (410 and 429),
        refused because the client's buffer was full (429); and the open connections."""
        document = {
            "posts": {
                name: self.post_outcomes[name]
                for name in ("delivered", "gone", "injectedGone", "injectedThrottle", "bufferFull")
            },
            "connections": len(self.clients),
        }
        return web.json_response(document)

    async def lose_disconnect(self, request: web.Request) -> web.Response:
        """Make this connection's $disconnect never happen, as it can on AWS: the next
        broadcast's 410 is then all that can clean the connection up."""
        client = self.clients.get(request.match_info["connection_id"])
        if client is None:
            return web.json_response({"message": "No such connection"}, status=404)
        client.report_disconnect = False
        return web.Response(status=204)

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = self.settings.static_dir / "index.html"
        if page.is_file():
            return web.FileResponse(page)
        return web.Response(
            text=f"WebSocket API: ws://{request.host}/{self.settings.stage}\n"
            f"Management API: http://{request.host}/{self.settings.stage}/@connections/{{connectionId}}\n"
        )

    async def forbidden(self, _: web.Request) -> web.Response:
        return _management_error(403, "ForbiddenException", "Forbidden")

    # --- 7. Lambda's Invoke API --------------------------------------------------------

    async def invoke_function(self, request: web.Request) -> web.Response:
        """Invoke for the hosted function: `Event` runs it in the background and
        answers 202 at once (one attempt, no retries, like the template's
        EventInvokeConfig); `RequestResponse` waits and answers what it returned."""
        body = await request.read()
        problem = self._signature_problem(request, body, "lambda")
        if problem is not None:
            return _management_error(403, "InvalidSignatureException", problem)
        runtime = self.runtime.settings
        name = _function_name(request.match_info["function"])
        if name != runtime.function_name:
            return _management_error(
                404, "ResourceNotFoundException", f"Function not found: {name}"
            )
        try:
            event = json.loads(body or b"{}")
        except ValueError:
            return _management_error(
                400, "InvalidRequestContentException", "Could not parse request body into json"
            )
        invocation_type = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if invocation_type == "Event":
            self._background(self.runtime.invoke(event, wait_seconds=runtime.timeout_seconds))
            return _management_response(202)
        if invocation_type == "DryRun":
            return _management_response(204)
        outcome = await self.runtime.invoke(event, wait_seconds=runtime.timeout_seconds + 1)
        if outcome.ok:
            return _management_response(200, json.dumps(outcome.result))
        error = outcome.error or {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out"}
        return _management_response(200, json.dumps(error), {"X-Amz-Function-Error": "Unhandled"})

    # --- Shutdown --------------------------------------------------------------------

    async def shutdown(self, timeout: float) -> None:
        """Close every connection with 1001 and wait for their $disconnects."""
        self.stopping = True
        for client in list(self.clients.values()):
            self._close(client, *GOING_AWAY)
        if not self._connection_tasks:
            return
        _, closing = await asyncio.wait(list(self._connection_tasks), timeout=SHUTDOWN_HANDSHAKE)
        # Clients that have not answered the close frame by now are cut off, so their
        # $disconnects are not held up by a close handshake timing out.
        for task in closing:
            client = self._connection_tasks.get(task)
            if client is not None and client.transport is not None and client.close_requested:
                client.transport.abort()
        if closing:
            await asyncio.wait(closing, timeout=timeout)


def _function_name(name_or_arn: str) -> str:
    """The name in a function name, ARN (arn:aws:lambda:region:account:function:name)
    or partial ARN, without its version or alias."""
    if name_or_arn.startswith("arn:"):
        return name_or_arn.split(":")[6]
    return name_or_arn.split(":")[0]


def _management_response(
    status: int, body: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    headers = {"x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}
    if body is None:
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _management_error(status: int, error_type: str, message: str | None = None) -> web.Response:
    """An error as API Gateway sends it: botocore reads the code from x-amzn-ErrorType."""
    body = None if message is None else json.dumps({"message": message})
    return _management_response(status, body, {"x-amzn-ErrorType": error_type})
